r"""An ensemble of fitted influence models: the (weighted) mean of their influences.

Influence is computed around one set of trained parameters, while retraining lands on
others; averaging over models trained from several seeds, or over checkpoints of one run
(as TRAK does), estimates the expectation that a seed-averaged ground truth measures:

$$
I_{\mathrm{ens}}(z', z) = \sum_{k=1}^K w_k\, I_k(z', z), \qquad
w_k = \frac{\omega_k}{\sum_l \omega_l} ,
$$

with $I_k$ the influence of member $k$ (its own network, curvature, $\lambda$ and method)
and $\omega_k \ge 0$ the given weights (equal by default).

**Factors.** The ensemble's influence factors are the members' factors, each scaled by its
weight, concatenated along the second axis: `(N, P_1 + ... + P_K)`. Since
`influences_from_factors` is linear in the factors, the members' scores from their slices
sum to the weighted mean, and the calculators (sequential or Dask) use the ensemble as any
other model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from torch.utils.data import DataLoader

import torch

from ...base_influence_function_model import InfluenceFunctionModel
from ...types import InfluenceMode, NotFittedException

__all__ = ["EnsembleInfluence"]

logger = logging.getLogger(__name__)

HEADER_FILE = "ensemble.json"
"""The file of an ensemble's directory that lists its members and weights."""


def _member_file(index: int) -> str:
    return f"member-{index}.pt"


def _fit_member(member: InfluenceFunctionModel, data: DataLoader) -> InfluenceFunctionModel:
    return member.fit(data)


def _check_members(members: Any) -> List[InfluenceFunctionModel]:
    try:
        items = list(members)
    except TypeError:
        raise TypeError(
            "Parameter 'members' must be a sequence of influence models, got a "
            f"{type(members).__name__}."
        ) from None
    if not items:
        raise ValueError("Parameter 'members' must hold at least one influence model, got none.")
    for index, member in enumerate(items):
        if not isinstance(member, InfluenceFunctionModel):
            raise TypeError(
                f"Parameter 'members' must hold influence models, member {index} is a "
                f"{type(member).__name__}."
            )
    return items


def _check_weights(weights: Any, n_members: int) -> List[float]:
    if weights is None:
        return [1.0 / n_members] * n_members
    values = [float(w) for w in torch.as_tensor(weights, dtype=torch.float64).reshape(-1)]
    if len(values) != n_members:
        raise ValueError(
            f"Parameter 'weights' must hold one weight per member ({n_members}), got {len(values)}."
        )
    if any(not (w >= 0.0 and w < float("inf")) for w in values) or sum(values) <= 0.0:
        raise ValueError(
            f"Parameter 'weights' must be finite, non-negative and not all zero, got {values}."
        )
    total = sum(values)
    return [w / total for w in values]


class EnsembleInfluence(InfluenceFunctionModel[torch.Tensor, DataLoader]):
    r"""The weighted mean of the influences of several fitted influence models.

    Members are influence models of the same task, typically the same architecture trained
    from different seeds or several checkpoints of one run, each fitted to its own network
    (any method, any $\lambda$). The ensemble has the API of a single model:
    [influence_factors][influx.torch.models.ensemble.EnsembleInfluence.influence_factors],
    [influences_from_factors][influx.torch.models.ensemble.EnsembleInfluence.influences_from_factors],
    [influences][influx.torch.models.ensemble.EnsembleInfluence.influences] and `self_influences`,
    and works with the calculators; `fit` fits the members (in parallel on a Dask client
    when given), `save` and `load_fit` store and restore their fits in a directory.

    A member whose solver reports that it did not converge (an indefinite curvature at its
    $\lambda$ makes CG, for one, fail) is named in a warning after each computation, since
    it would pull the mean away from the other members.

    Args:
        members: the influence models, all fitted before use (`fit` on the ensemble fits
            each of them on the same data).
        weights: one non-negative weight per member (normalised to sum to 1), e.g. to weight
            checkpoints; None for the plain mean.

    Raises:
        TypeError: if `members` is not a sequence of influence models.
        ValueError: for no member, or `weights` of another length, negative, infinite or
            all zero.
    """

    def __init__(self, members: Sequence[InfluenceFunctionModel], weights: Optional[Any] = None):
        self.members = _check_members(members)
        self.weights = _check_weights(weights, len(self.members))
        self._widths: Optional[List[int]] = None

    @property
    def is_fitted(self) -> bool:
        return all(member.is_fitted for member in self.members)

    @property
    def is_thread_safe(self) -> bool:
        return all(member.is_thread_safe for member in self.members)

    @property
    def n_parameters(self) -> int:
        """The total number of parameters of the members."""
        return sum(member.n_parameters for member in self.members)

    @property
    def dtype(self) -> Optional[torch.dtype]:
        """The members' common dtype (None if they differ)."""
        dtypes = {getattr(member, "dtype", None) for member in self.members}
        return dtypes.pop() if len(dtypes) == 1 else None

    def fit(self, data: DataLoader, client: Any = None) -> "EnsembleInfluence":
        """Fit every member on `data` (each to its own network) and return the ensemble.

        Args:
            data: the training data, the same for every member.
            client: a `distributed.Client` to fit the members in parallel, one task each;
                the ensemble then holds the fitted copies returned by the workers (the
                objects passed as `members` stay as they were). None fits them here.
        """
        if client is None:
            for member in self.members:
                member.fit(data)
            return self
        futures = client.map(_fit_member, self.members, data=data, pure=False)
        self.members = list(client.gather(futures))
        return self

    def save(self, directory: Union[str, Path]) -> Path:
        """Save the fit of every member (with its own `save`) and the weights to
        `directory`: `member-<k>.pt` per member and `ensemble.json`.

        Raises:
            NotFittedException: if a member is not fitted.
            TypeError: if a member cannot be saved.
        """
        from ... import __version__

        self._require_fitted()
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for index, member in enumerate(self.members):
            save = getattr(member, "save", None)
            if save is None:
                raise TypeError(
                    f"Member {index} of the ensemble ({type(member).__name__}) cannot be saved."
                )
            save(path / _member_file(index))
        header = {
            "classes": [type(member).__name__ for member in self.members],
            "weights": self.weights,
            "influx_version": __version__,
        }
        (path / HEADER_FILE).write_text(json.dumps(header, indent=1) + "\n")
        return path

    def load_fit(
        self, directory: Union[str, Path], data: Optional[DataLoader] = None
    ) -> "EnsembleInfluence":
        """Load the fits saved by `save` into the members (built as when they were saved,
        on the same networks) and return the ensemble.

        Args:
            directory: the directory written by `save`.
            data: the training data, for members whose methods need it again (CG, LiSSA).

        Raises:
            ValueError: if the directory holds another number of members, other classes or
                other weights, or a member's file does not match it (see the members'
                `load_fit`).
        """
        path = Path(directory)
        header = json.loads((path / HEADER_FILE).read_text())
        classes = [type(member).__name__ for member in self.members]
        if header.get("classes") != classes:
            raise ValueError(
                f"Parameter 'directory': {str(path)!r} holds an ensemble of "
                f"{header.get('classes')}, this ensemble has {classes}."
            )
        saved = [float(w) for w in header.get("weights", [])]
        if len(saved) != len(self.weights) or any(
            abs(a - b) > 1e-12 for a, b in zip(saved, self.weights)
        ):
            raise ValueError(
                f"Parameter 'directory': {str(path)!r} was saved with weights {saved}, this "
                f"ensemble has {self.weights}."
            )
        for index, member in enumerate(self.members):
            member.load_fit(path / _member_file(index), data)  # type: ignore[attr-defined]
        return self

    def _require_fitted(self) -> None:
        for index, member in enumerate(self.members):
            if not member.is_fitted:
                logger.debug("Member %d of the ensemble is not fitted.", index)
                raise NotFittedException(type(member))

    def _warn_unconverged(self) -> None:
        for index, member in enumerate(self.members):
            reports = getattr(member, "solver_diagnostics", None) or {}
            failed = [name for name, r in reports.items() if r is not None and not r.converged]
            if failed:
                logger.warning(
                    "Member %d of the ensemble (%s): the solver of block(s) %s did not "
                    "converge; its influences may pull the mean away (raise its "
                    "regularization or iterations, or drop it).",
                    index,
                    type(member).__name__,
                    ", ".join(map(repr, failed)),
                )

    def influence_factors(self, x: Any, y: Any) -> torch.Tensor:
        r"""The members' factors $w_k (H_k + \lambda_k I)^{-1}\nabla\ell_k(x_i, y_i)$,
        concatenated: shape `(N, P_1 + ... + P_K)`."""
        self._require_fitted()
        factors = [w * m.influence_factors(x, y) for m, w in zip(self.members, self.weights)]
        self._warn_unconverged()
        self._widths = [int(f.shape[1]) for f in factors]
        return torch.cat(factors, dim=1)

    def _factor_widths(self, factors: torch.Tensor) -> List[int]:
        # the widths of the factors computed so far; before any, the members' parameters
        widths = self._widths or [member.n_parameters for member in self.members]
        if factors.ndim != 2 or factors.shape[1] != sum(widths):
            raise ValueError(
                "Parameter 'z_test_factors' must be the ensemble's factors, of shape (N, "
                f"{sum(widths)}) (the members' {widths} concatenated), got shape "
                f"{tuple(factors.shape)}."
            )
        return widths

    def influences_from_factors(
        self,
        z_test_factors: torch.Tensor,
        x: Any,
        y: Any,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> torch.Tensor:
        """The weighted mean of the members' influences, from the ensemble's factors."""
        self._require_fitted()
        slices = torch.split(z_test_factors, self._factor_widths(z_test_factors), dim=1)
        result: Optional[torch.Tensor] = None
        for member, part in zip(self.members, slices):
            values = member.influences_from_factors(part, x, y, mode)
            result = values if result is None else result + values
        assert result is not None
        return result

    def influences(
        self,
        x_test: Any,
        y_test: Any,
        x: Optional[Any] = None,
        y: Optional[Any] = None,
        mode: InfluenceMode = InfluenceMode.Up,
    ) -> torch.Tensor:
        r"""$\sum_k w_k I_k$ of `(x, y)` on `(x_test, y_test)`, with the shapes of a single
        model's `influences`."""
        self._require_fitted()
        result: Optional[torch.Tensor] = None
        for member, weight in zip(self.members, self.weights):
            values = weight * member.influences(x_test, y_test, x, y, mode)
            result = values if result is None else result + values
        self._warn_unconverged()
        assert result is not None
        return result

    def self_influences(
        self, x: Any, y: Any, mode: InfluenceMode = InfluenceMode.Up
    ) -> torch.Tensor:
        r"""$\sum_k w_k I_k(z_i, z_i)$ for each point of `(x, y)`."""
        self._require_fitted()
        result: Optional[torch.Tensor] = None
        for index, (member, weight) in enumerate(zip(self.members, self.weights)):
            compute = getattr(member, "self_influences", None)
            if compute is None:
                raise TypeError(
                    f"Member {index} of the ensemble ({type(member).__name__}) does not "
                    "compute self-influences."
                )
            values = weight * compute(x, y, mode)
            result = values if result is None else result + values
        assert result is not None
        return result
