r"""Tasks: what the influence of a training point is measured on.

By default an influence model takes a loss function `loss(outputs, y)` and calls the model on
the inputs of a batch (see [call_model][influx.torch.autodiff.model_call.call_model]). A
[Task][influx.torch.data.task.Task] replaces both for everything the default does not cover: a
model that computes its own loss, inputs that need preparing, or a test-side quantity that
is not the training loss. With a task $T$, the influence of a training point $z$ on a test
point $z'$ is

$$
I(z', z) = \left\langle (C + \lambda I)^{-1} \nabla_\theta m(z'), \nabla_\theta \ell(z)
\right\rangle ,
$$

with $\ell$ the task's `loss` (which also defines the curvature $C$) and $m$ its
`measurement` (by default the loss). A task is accepted wherever a loss function is, by
every influence model and by [ComposedInfluence][influx.torch.models.ComposedInfluence].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Optional

import torch

from ..autodiff.model_call import LossFunction, call_model, model_outputs

__all__ = ["Task", "SupervisedTask"]


class Task(ABC):
    r"""The training loss, the test-side measurement and the perturbed input of a model.

    Subclasses implement `loss`; `measurement` defaults to the loss and `perturbation_input`
    to the default choice. Every method receives the model as a callable: call it as you
    would call the module (`model(**x)`, `model(x)`); during influence computations it
    evaluates the module with the parameters being differentiated, without modifying it.

    A task must treat samples independently (each sample's loss depends on that sample
    only): per-sample values are the task's values on batches of one sample.

    Example:
        ```python
        class Margin(Task):
            def loss(self, model, x, y):
                return F.cross_entropy(model(**x).logits, y)

            def measurement(self, model, x, y):
                logits = model(**x).logits
                correct = logits.gather(1, y[:, None]).squeeze(1)
                other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -1e9)
                return (other.logsumexp(1) - correct).mean()
        ```
    """

    @abstractmethod
    def loss(self, model: Callable[..., Any], x: Any, y: Any) -> torch.Tensor:
        r"""The training loss of a batch, a scalar: the mean over its samples of
        $\ell(z_i)$. It defines the curvature and the training-side gradients."""

    def measurement(self, model: Callable[..., Any], x: Any, y: Any) -> torch.Tensor:
        r"""The test-side quantity $m$ of a batch, a scalar: the mean over its samples
        (a margin, a logit, the log-probability of a generated token, ...). Influence factors
        and the test side of influences are its gradients. Defaults to `loss`."""
        return self.loss(model, x, y)

    def perturbation_input(self, x: Any) -> Optional[str]:
        """Which floating-point entry of the inputs `x` Perturbation mode differentiates, by
        key (a dict key, a tuple index as a string, dotted for nested structures), e.g.
        `"inputs_embeds"`; None (the default) for `x` itself if it is a tensor, else its only
        floating-point tensor."""
        return None


class SupervisedTask(Task):
    """The default task of a loss function: `loss(model_outputs(model(x)), y)`.

    Subclass it to change only the measurement (or the perturbed input) of an ordinary
    supervised model.

    Args:
        loss_function: `loss(outputs, y)` with mean reduction; outputs with a `logits`
            attribute are reduced to their logits first.
    """

    def __init__(self, loss_function: LossFunction):
        if not callable(loss_function):
            raise TypeError(
                "Parameter 'loss_function' must be callable as loss(outputs, y), got "
                f"{type(loss_function).__name__}."
            )
        self.loss_function = loss_function

    def loss(self, model: Callable[..., Any], x: Any, y: Any) -> torch.Tensor:
        return self.loss_function(model_outputs(call_model(model, x)), y)
