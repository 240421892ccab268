r"""Causal language models: next-token cross-entropy per sequence, and on completions only.

A training sample is a sequence: its loss is the next-token cross-entropy of its tokens,
summed (the default) or averaged over the tokens that carry a label,

$$
\ell(z) = \sum_{t=1}^{T-1} w_t \, \bigl(-\log p_\theta(x_{t} \mid x_{<t})\bigr),
\qquad w_t = m_t \text{ (sum) or } w_t = \frac{m_t}{\sum_s m_s} \text{ (mean)},
$$

with $m_t = 1$ where token $t$ has a label (not `-100`) and both it and the token before it
are attended (attention mask 1), else 0: the first token of a left-padded sequence is
predicted from padding and has no loss, as the first token of any sequence. The loss of a batch is the mean of $\ell$ over its sequences, so that an influence is
per sequence (per-sample = per-sequence) and the curvature is the mean over sequences.

The measurement on the test side is the same quantity restricted to the completion: with a
`completion_mask` entry in the inputs (1 on the completion's tokens, 0 on the prompt), only
those tokens count, $m_t \leftarrow m_t c_t$. Without it, the measurement is the loss.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Tuple

import torch.nn.functional as F

import torch

from ..autodiff.model_call import model_outputs
from .task import Task

__all__ = ["CausalLMTask", "IGNORE_INDEX"]

IGNORE_INDEX = -100
"""The label of a token that has no loss (Hugging Face's and `cross_entropy`'s convention)."""


class CausalLMTask(Task):
    r"""The next-token cross-entropy of causal language models, one sample per sequence.

    Inputs `x` are a mapping of the model's keyword arguments (`input_ids`, `attention_mask`,
    ..., as a Hugging Face collator makes them) or a tensor of token ids for a plain module
    `model(ids)`; the model returns logits `(N, T, V)`, or an output with a `logits` attribute
    (Hugging Face causal LMs). Labels `y` `(N, T)` are aligned with the inputs, as for
    Hugging Face (`labels = input_ids`, shifted inside): the logits at position $t-1$ predict
    the label at $t$; a label `-100` has no loss, nor has a position whose attention mask is 0
    (padding, on either side) or follows a position whose mask is 0. `y=None` takes the input ids as labels.

    Per-token losses are aligned with the tokens: the loss of token $t$ is that of predicting
    it, and token 0 has none (see `token_losses`).

    Args:
        reduction: `"sum"` (the default): a sequence's loss is the sum of its tokens' losses,
            so that a longer sequence weighs more; `"mean"`: their mean, Hugging Face's loss
            for a single sequence.
        completion_key: the entry of `x` that marks the completion for the measurement (1 on
            the completion, 0 on the prompt); removed from the inputs before the model is
            called. Absent from a batch, the measurement is the loss.
        position_ids_from_mask: whether to pass `position_ids` computed from the attention
            mask (`cumsum - 1`, as Hugging Face's `generate` does), so that a left-padded
            sequence gets the positions it has unpadded. Only for mapping inputs without
            `position_ids` of their own, and models that accept the argument.

    Example:
        ```python
        task = CausalLMTask()  # summed over each sequence's tokens
        model = EkfacInfluence(gpt2, True, loss=task).fit(loader)  # batches {"input_ids",
        values = model.influences(x_test, y_test, x_train, y_train)  # "attention_mask", "labels"}
        ```
    """

    def __init__(
        self,
        reduction: Literal["sum", "mean"] = "sum",
        completion_key: str = "completion_mask",
        position_ids_from_mask: bool = False,
    ):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"Parameter 'reduction' must be 'sum' or 'mean', got {reduction!r}.")
        if not isinstance(completion_key, str):
            raise TypeError(
                "Parameter 'completion_key' must be a string (a key of the inputs), got "
                f"{type(completion_key).__name__}."
            )
        self.reduction = reduction
        self.completion_key = completion_key
        self.position_ids_from_mask = position_ids_from_mask

    def _logits(self, model: Callable[..., Any], x: Any) -> torch.Tensor:
        if isinstance(x, Mapping):
            inputs = {k: v for k, v in x.items() if k != self.completion_key}
            mask = inputs.get("attention_mask")
            if self.position_ids_from_mask and mask is not None and "position_ids" not in inputs:
                inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
            outputs = model(**inputs)
        else:
            outputs = model(x)
        logits = model_outputs(outputs)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
            raise ValueError(
                "Parameter 'model' must return logits of shape (N, T, vocabulary) (or an "
                f"output with such `logits`), got {type(logits).__name__} of shape {shape}."
            )
        return logits

    def token_losses(
        self, model: Callable[..., Any], x: Any, y: Any, completion: bool = False
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        r"""The per-token cross-entropies and their weights, both `(N, T)`.

        Position $t \geq 1$ holds $-\log p_\theta(y_t \mid x_{<t})$ and its weight $w_t$ (see
        the module); position 0 and the positions without a label hold 0. A sequence's loss
        is `(losses * weights).sum(1)`.

        Args:
            model: the model, as a callable.
            x: the inputs.
            y: the labels `(N, T)`, or None for the input ids.
            completion: whether to count the completion's tokens only (the measurement).
        """
        logits = self._logits(model, x)
        ids = x.get("input_ids") if isinstance(x, Mapping) else x
        labels = ids if y is None else y
        if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else None
            raise ValueError(
                f"Parameter 'y' must hold labels of shape {tuple(logits.shape[:2])} (one per "
                f"token, {IGNORE_INDEX} for none), got {type(labels).__name__} of shape {shape}."
            )
        valid = labels != IGNORE_INDEX
        if isinstance(x, Mapping):
            if x.get("attention_mask") is not None:
                attended = x["attention_mask"] != 0
                # a token is predicted from the attended token before it: the first token
                # after left padding has no context, as token 0 has none
                valid = valid & attended & torch.cat([attended[:, :1], attended[:, :-1]], 1)
            if completion and x.get(self.completion_key) is not None:
                valid = valid & (x[self.completion_key] != 0)
        targets = labels[:, 1:].clamp_min(0)
        predicted = logits[:, :-1]
        losses = F.cross_entropy(
            predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), reduction="none"
        ).reshape(targets.shape)
        weights = valid[:, 1:].to(losses.dtype)
        if self.reduction == "mean":
            weights = weights / weights.sum(1, keepdim=True).clamp_min(1.0)
        zero = losses.new_zeros(losses.shape[0], 1)
        return (
            torch.cat([zero, losses * (weights != 0)], dim=1),
            torch.cat([zero, weights], dim=1),
        )

    def sequence_losses(
        self, model: Callable[..., Any], x: Any, y: Any, completion: bool = False
    ) -> torch.Tensor:
        r"""$\ell(z_i)$ of every sequence, `(N,)` (on the completion only if `completion`)."""
        losses, weights = self.token_losses(model, x, y, completion)
        return (losses * weights).sum(1)

    def token_loss_terms(self, model: Callable[..., Any], x: Any, y: Any) -> torch.Tensor:
        r"""The weighted per-token losses $w_t \ell_t$ `(N, T)`, summing over $T$ to the
        sequences' losses: the per-token values of the training side."""
        losses, weights = self.token_losses(model, x, y)
        return losses * weights

    def token_measurements(self, model: Callable[..., Any], x: Any, y: Any) -> torch.Tensor:
        r"""The weighted per-token losses on the completion `(N, T)`, summing over $T$ to the
        sequences' measurements: the per-token values of the test side."""
        losses, weights = self.token_losses(model, x, y, completion=True)
        return losses * weights

    def loss(self, model: Callable[..., Any], x: Any, y: Any) -> torch.Tensor:
        return self.sequence_losses(model, x, y).mean()

    def measurement(self, model: Callable[..., Any], x: Any, y: Any) -> torch.Tensor:
        return self.sequence_losses(model, x, y, completion=True).mean()
