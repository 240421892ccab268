r"""Influence models: the user-facing classes that fit curvature and compute influences.

Every model here is a [TorchComposableInfluence][influx.torch.base.TorchComposableInfluence]:
the model's parameters are split into blocks and each block gets its own operator
$A_b \approx (C_b + \lambda_b I)^{-1}$, where $C_b$ is the Hessian or the Gauss-Newton matrix
of the mean training loss restricted to the block (see
[SecondOrderMode][influx.torch.operator.SecondOrderMode]).

**Sign and scale.** Entry $(i, j)$ of `influences` is

$$
I(z'_i, z_j) = \nabla_\theta \ell(z'_i)^\top (C + \lambda I)^{-1} \nabla_\theta \ell(z_j),
$$

without a minus sign and without a factor $1/n$: a positive value means that training point
$z_j$ helps (up-weighting it lowers the loss of) test point $z'_i$. `Perturbation` mode
differentiates the same quantity with respect to the features of $z_j$.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
from torch.utils.data import DataLoader

from .base import TorchComposableInfluence, TorchOperatorGradientComposition
from .functional import LossFunction
from .operator import DirectSolveOperator, SecondOrderMode, curvature_operator
from .util import BlockMode, BlockStructure, RegularizationType

__all__ = ["DirectInfluence"]

logger = logging.getLogger(__name__)


def _check_second_order_mode(mode: SecondOrderMode) -> SecondOrderMode:
    try:
        return SecondOrderMode(mode)
    except ValueError:
        valid = [m.name for m in SecondOrderMode]
        raise ValueError(
            f"Parameter 'second_order_mode' must be one of {valid}, got {mode!r}."
        ) from None


class DirectInfluence(TorchComposableInfluence):
    r"""Exact influence through a dense curvature matrix, factorised once per block.

    On `fit`, the curvature $C_b$ of each block (Hessian or Gauss-Newton matrix of the mean
    training loss, averaged over the data loader weighting every batch by its size) is formed
    as a dense $P_b \times P_b$ matrix and $C_b + \lambda_b I$ is factorised (Cholesky, or LU /
    pseudo-inverse when it is not positive definite; see
    [DirectSolveOperator][influx.torch.operator.DirectSolveOperator]). Influence factors are
    then $(C_b + \lambda_b I)^{-1} \nabla_{\theta_b} \ell(z')$ and

    $$
    I(z', z) = \sum_b \nabla_{\theta_b} \ell(z')^\top (C_b + \lambda_b I)^{-1}
    \nabla_{\theta_b} \ell(z) ,
    $$

    positive when $z$ helps $z'$, without a minus sign and without $1/n$.

    Memory is $O(P_b^2)$ per block: use it for models up to a few ten thousand parameters per
    block, or with a layer-wise or parameter-wise block structure.

    Args:
        model: the trained model.
        loss: the loss `loss(prediction, target)` with mean reduction, e.g.
            `torch.nn.functional.cross_entropy`.
        regularization: $\lambda \ge 0$, a float for all blocks or a dict keyed by block name.
        block_structure: a [BlockMode][influx.torch.util.BlockMode] or an
            `OrderedDict[str, List[str]]` mapping block names to parameter names.
        second_order_mode: the curvature, `SecondOrderMode.HESSIAN` or `GAUSS_NEWTON`.

    Example:
        ```python
        model = DirectInfluence(net, F.cross_entropy, regularization=0.01).fit(train_loader)
        values = model.influences(x_test, y_test, x_train, y_train)  # (n_test, n_train)
        ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFunction,
        regularization: RegularizationType = None,
        block_structure: BlockStructure = BlockMode.FULL,
        second_order_mode: SecondOrderMode = SecondOrderMode.HESSIAN,
    ):
        super().__init__(model, block_structure, regularization)
        self.loss = loss
        self.second_order_mode = _check_second_order_mode(second_order_mode)

    def _create_block(
        self,
        block_name: str,
        block_params: Dict[str, torch.nn.Parameter],
        data: DataLoader,
        regularization: Optional[float],
    ) -> TorchOperatorGradientComposition:
        curvature = curvature_operator(
            self.second_order_mode, self.model, self.loss, data, block_params
        ).to_dense()
        op = DirectSolveOperator(curvature, regularization=regularization)
        logger.debug(
            "Block %r: %d parameters, %s factorisation.",
            block_name,
            op.input_size,
            op.factorization,
        )
        return TorchOperatorGradientComposition(
            op, self._gradient_provider(self.loss, block_name, block_params)
        )
