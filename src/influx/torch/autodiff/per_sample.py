r"""Per-sample gradients, also for models that `vmap` cannot map.

[PerSampleGradients][influx.torch.autodiff.per_sample.PerSampleGradients] computes
$\{\text{name}: (\nabla_\theta \ell_i)_i\}$ with one `vmap` over the samples of a batch. Some
models take a Python branch on the values of their inputs (the attention of Hugging Face
models skips a 2-D padding mask `if mask.all()`), and some operators have no batching rule
(the fused kernels of `nn.LSTM`, `nn.GRU`, `nn.RNN` and their cells), which `vmap` cannot map.
Such a model is detected on the first call (one warning; recurrent layers are recognised up
front, with one info line) and from then on differentiated without mapping the forward pass:

- for a loss function `loss(outputs, y)`, chunk by chunk: one forward pass of the chunk, the
  per-sample output gradients $u_i = |c| \, \partial L_c / \partial z_i$ of the chunk loss
  $L_c = \frac{1}{|c|}\sum_{i \in c} \ell_i(z_i)$, and one backward pass per sample, vectorised
  with `vmap` over the cotangents $e_i u_i^\top$ (the backward pass has no branch). This needs
  the loss to be the mean of per-sample terms, which is checked against the loop below on the
  first samples; if it is not, the loop is used;
- otherwise (a task, or outputs whose first dimension is not the samples'), a loop over the
  samples with one backward pass each.

All three give the same values.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

from torch.func import grad, vjp, vmap
from torch.utils import _pytree as pytree

import torch

from ..data.structures import rows
from .model_call import is_data_dependent_control_flow, is_vmap_limitation

__all__ = ["CHUNK_SIZE", "PerSampleGradients"]

logger = logging.getLogger(__name__)

ParamDict = Dict[str, torch.Tensor]
CHUNK_SIZE = 16
"""Samples per forward pass of the chunked fallback: its backward passes cost
$|c|$ times those of one sample each."""


class PerSampleGradients:
    r"""$(\theta, x, y) \mapsto \{\text{name}: (\nabla_\theta \ell_i)_i\}$, shapes `(N, *p.shape)`.

    See the [module description][influx.torch.autodiff.per_sample].

    Args:
        single: $(\theta, x_i, y_i) \mapsto \ell_i(\theta)$ for one sample without batch
            dimension.
        outputs: for the chunked fallback, $(\theta, x) \mapsto$ the model's outputs on a
            batch, with `loss` the function `loss(outputs, y)`; None if there is none (a task).
        loss: the loss function of `outputs`.
        model_name: the model's name, for the warning.
        unmappable: the names of the model's modules that `vmap` is known not to map (its
            recurrent layers): the fallback is then taken from the first call.
    """

    def __init__(
        self,
        single: Callable[[ParamDict, Any, Any], torch.Tensor],
        outputs: Optional[Callable[[ParamDict, Any], Any]] = None,
        loss: Optional[Callable[[Any, Any], torch.Tensor]] = None,
        model_name: str = "the model",
        unmappable: Optional[List[str]] = None,
    ):
        self._single = single
        self._vectorised = vmap(grad(single), in_dims=(None, 0, 0))
        self._outputs = outputs
        self._loss = loss
        self._model_name = model_name
        self._unmappable = list(unmappable or [])
        self.strategy = "vmap"
        """`"vmap"`, then `"chunked"` or `"loop"` once the model is found not to map."""

    def __call__(self, p: ParamDict, x: Any, y: Any) -> ParamDict:
        if self.strategy == "vmap":
            if self._unmappable:
                return self._choose_fallback(p, x, y)
            try:
                return self._vectorised(p, x, y)  # type: ignore[no-any-return]
            except RuntimeError as error:
                if not is_vmap_limitation(error):
                    raise
                return self._choose_fallback(p, x, y, error)
        if self.strategy == "chunked":
            return self.chunked(p, x, y)
        return self.loop(p, x, y)

    def _choose_fallback(
        self, p: ParamDict, x: Any, y: Any, error: Optional[RuntimeError] = None
    ) -> ParamDict:
        result: Optional[ParamDict] = None
        if self._outputs is not None:
            try:
                result = self.chunked(p, x, y)
                n = min(2, int(pytree.tree_leaves(x)[0].shape[0]))
                check = self.loop(p, rows(x, 0, n), rows(y, 0, n))
                if not all(
                    torch.allclose(result[k][:n], check[k], rtol=1e-5, atol=1e-8) for k in p
                ):
                    result = None  # the loss is not a mean of per-sample terms
            except (RuntimeError, ValueError):
                result = None
        self.strategy = "loop" if result is None else "chunked"
        how = (
            "one forward pass per chunk and vectorised backward passes"
            if result is not None
            else "one sample at a time"
        )
        if error is None:
            logger.info(
                "Per-sample gradients: %s has recurrent layers (%s) whose kernels vmap cannot "
                "map; computing them with %s (same values).",
                self._model_name,
                ", ".join(self._unmappable),
                how,
            )
        elif is_data_dependent_control_flow(error):
            logger.warning(
                "Per-sample gradients: %s branches on the values of its inputs, which vmap "
                "cannot map; computing them with %s (same values, slower). See 'Your own model' "
                "in the documentation for models without the branch.",
                self._model_name,
                how,
            )
        else:
            logger.warning(
                "Per-sample gradients: vmap cannot map %s (%s); computing them with %s (same "
                "values, slower).",
                self._model_name,
                str(error).split(".")[0],
                how,
            )
        return self.loop(p, x, y) if result is None else result

    def chunked(self, p: ParamDict, x: Any, y: Any, chunk_size: int = CHUNK_SIZE) -> ParamDict:
        """The per-sample gradients from one forward pass per chunk of samples (for a loss
        `loss(outputs, y)` that is the mean of per-sample terms)."""
        assert self._outputs is not None and self._loss is not None
        outputs_of, loss = self._outputs, self._loss
        n = int(pytree.tree_leaves(x)[0].shape[0])
        parts: Dict[str, List[torch.Tensor]] = {name: [] for name in p}
        for start in range(0, n, chunk_size):
            x_c, y_c = rows(x, start, start + chunk_size), rows(y, start, start + chunk_size)
            m = int(pytree.tree_leaves(x_c)[0].shape[0])
            forward = vjp(lambda q, x_c=x_c: outputs_of(q, x_c), p)
            z, pullback = forward[0], forward[1]
            if not isinstance(z, torch.Tensor) or z.ndim == 0 or z.shape[0] != m:
                raise ValueError("The outputs do not have the samples as first dimension.")
            u = grad(lambda out, y_c=y_c: loss(out, y_c))(z.detach()) * m
            eye = torch.eye(m, dtype=z.dtype, device=z.device).reshape(m, m, *[1] * (z.ndim - 1))
            (grads,) = vmap(pullback)(eye * u.unsqueeze(0))
            for name in p:
                parts[name].append(grads[name])
        return {name: torch.cat(parts[name]) for name in p}

    def loop(self, p: ParamDict, x: Any, y: Any) -> ParamDict:
        """The per-sample gradients by a loop over the samples, each a plain backward pass
        (with respect to copies of the parameters that require gradients)."""
        n = int(pytree.tree_leaves(x)[0].shape[0])
        names = list(p)
        rows = []
        with torch.enable_grad():
            for i in range(n):
                leaves = {name: p[name].detach().requires_grad_(True) for name in names}
                x_i = pytree.tree_map(lambda t, i=i: t[i], x)
                y_i = pytree.tree_map(lambda t, i=i: t[i], y)
                value = self._single(leaves, x_i, y_i)
                grads = torch.autograd.grad(
                    value, [leaves[name] for name in names], allow_unused=True
                )
                rows.append(
                    [torch.zeros_like(p[k]) if g is None else g for k, g in zip(names, grads)]
                )
        return {name: torch.stack([row[k] for row in rows]) for k, name in enumerate(names)}
