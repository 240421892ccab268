r"""Rankings over the checkpoints of a training run: TracIn-CP and checkpoint-averaged
influence (see [InfluenceTracker][influx.torch.workflows.tracker.InfluenceTracker]).

For checkpoints $\theta_1, \dots, \theta_K$ with learning rates $\eta_k$, TracIn-CP scores
training point $z_j$ by $T_j = \sum_k \eta_k \big(\sum_i \nabla_\theta m(z'_i;
\theta_k)\big)^\top \nabla_\theta \ell(z_j; \theta_k)$, and checkpoint-averaged influence by
the mean over checkpoints of the influence model's total influence.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import torch

from ..data.batches import iterate_batches
from ..gradients.provider import TorchGradientProvider
from .tracker_state import Checkpoint
from .valuation import HarmfulRanking

__all__ = ["average_over_checkpoints", "tracin_values"]


def tracin_values(
    model: torch.nn.Module, loss: Any, train_loader: Iterable, validation_loader: Iterable
) -> torch.Tensor:
    r"""$\big(\sum_i \nabla m(z'_i)\big)^\top \nabla \ell(z_j)$ for every training point
    $z_j$, with $m$ the measurement on the validation points $z'_i$.

    Raises:
        ValueError: if a loader yields no batches.
    """
    provider = TorchGradientProvider(model, loss)
    device = provider.device
    summed: Optional[torch.Tensor] = None
    for batch in iterate_batches(validation_loader, device, "validation_loader"):
        g = provider.flat_grads(batch.as_test()).sum(dim=0)
        summed = g if summed is None else summed + g
    if summed is None:
        raise ValueError("Parameter 'validation_loader' yielded no batches.")
    values = [
        provider.jacobian_prod(batch, summed[None, :])[:, 0]
        for batch in iterate_batches(train_loader, device, "train_loader")
    ]
    if not values:
        raise ValueError("Parameter 'train_loader' yielded no batches.")
    return torch.cat(values).detach()


def average_over_checkpoints(
    model: torch.nn.Module,
    checkpoints: Sequence[Checkpoint],
    averaging: str,
    rank_model: Callable[[torch.nn.Module], HarmfulRanking],
    tracin: Callable[[torch.nn.Module], torch.Tensor],
) -> HarmfulRanking:
    """The ranking by TracIn-CP (`averaging="tracin"`) or by checkpoint-averaged influence
    (`"influence"`), evaluated on a copy of `model` loaded with each checkpoint in turn (the
    model itself is not written)."""
    shadow = copy.deepcopy(model)
    for parameter in shadow.parameters():
        parameter.grad = None
    total: Optional[torch.Tensor] = None
    converged = True
    diagnostics: Dict[str, Any] = {}
    for number, checkpoint in enumerate(checkpoints):
        state = checkpoint.load()
        with torch.no_grad():
            for name, parameter in shadow.named_parameters():
                parameter.copy_(state[name])
        if averaging == "tracin":
            values = checkpoint.learning_rate * tracin(shadow)
        else:
            ranking = rank_model(shadow)
            values = ranking.values / len(checkpoints)
            converged = converged and ranking.converged
            for block, d in (ranking.solver_diagnostics or {}).items():
                diagnostics[f"checkpoint {number} (step {checkpoint.step}): {block}"] = d
        total = values if total is None else total + values
    assert total is not None
    return HarmfulRanking(torch.argsort(total, stable=True), total, converged, diagnostics or None)
