r"""Kronecker-factored operators of one layer: the curvature $Q\,\mathrm{diag}(s)\,Q^\top$ and
its regularized inverse, for $Q = Q_G \otimes Q_A$ (see [influx.torch.kfac.factors][influx.torch.kfac.factors]
for how the factors are fitted).

Both act on the layer's flat gradients (weight flattened, then bias, the order of
`named_parameters()`), laid out as the matrix $V = [W \mid b]$ `(m, k)`; the Kronecker
structure is over the row-major flattening of $V$. Applying either costs two small matrix
products on each side and never forms a $P \times P$ matrix:

$$
V \mapsto Q_G \left[ \left(Q_G^\top V Q_A\right) \odot S \right] Q_A^\top ,
$$

with $S = s$ for the curvature and $S = 1 / (s + \lambda)$ for the inverse.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch

from ...types import SolverDiagnostics
from ..curvature.conditioning import check_eigenvalue_conditioning
from ..curvature.tensor_operator import TensorDictOperator
from ..data.state import OperatorState, StateContext
from ..data.validation import check_nonconvergence_policy, validate_regularization
from .contraction import rotated_gradients
from .factors import KroneckerEigenbasis, KroneckerFactors

__all__ = ["KroneckerFactoredCurvature", "KroneckerFactoredOperator"]

logger = logging.getLogger(__name__)

_DTYPES = {str(t): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


class KroneckerFactoredCurvature(TensorDictOperator):
    r"""The Kronecker-factored curvature $Q\,\mathrm{diag}(s)\,Q^\top$ of one layer.

    For K-FAC $s = \lambda_G \lambda_A^\top$; for EK-FAC $s$ is refitted to the data. As a
    curvature operator it can be inverted by any method that only needs its products (CG, low rank);
    its exact inverse is [KroneckerFactoredOperator][influx.torch.kfac.operators.KroneckerFactoredOperator].

    Args:
        input_eigenvectors: $Q_A$ `(k, k)`.
        output_eigenvectors: $Q_G$ `(m, m)`.
        eigenvalues: $s$ `(m, k)`, non-negative.
        weight_name: the weight's parameter name, None if the weight is not part of the block.
        weight_shape: the weight's shape (`(m, d)` or `(m, c, kh, kw)`; `(d, m)` for a
            transposed weight).
        bias_name: the bias's parameter name, None if the bias is not part of the block.
        method: `"ekfac"` or `"kfac"`.
        dtype: the dtype of inputs and results (the eigenvectors are cast to it); default
            that of the eigenvectors.
        layer_name: the layer's name, for messages and diagnostics.
        factors: the Kronecker factors $A$ and $G$ the eigenbasis came from, if known.
        eigenbasis: the eigendecompositions of the factors, if known.
        weight_transposed: whether the weight is stored as $W^\top$ `(d, m)` (GPT-2's
            `Conv1D`, $s = a W + b$).
    """

    supports_regularization = False

    def __init__(
        self,
        input_eigenvectors: torch.Tensor,
        output_eigenvectors: torch.Tensor,
        eigenvalues: torch.Tensor,
        weight_name: Optional[str],
        weight_shape: Tuple[int, ...],
        bias_name: Optional[str] = None,
        method: str = "ekfac",
        dtype: Optional[torch.dtype] = None,
        layer_name: str = "",
        factors: Optional[KroneckerFactors] = None,
        eigenbasis: Optional[KroneckerEigenbasis] = None,
        weight_transposed: bool = False,
    ):
        k, m = input_eigenvectors.shape[0], output_eigenvectors.shape[0]
        if input_eigenvectors.shape != (k, k) or output_eigenvectors.shape != (m, m):
            raise ValueError(
                "Parameters 'input_eigenvectors' and 'output_eigenvectors' must be square, got "
                f"{tuple(input_eigenvectors.shape)} and {tuple(output_eigenvectors.shape)}."
            )
        if tuple(eigenvalues.shape) != (m, k):
            raise ValueError(
                f"Parameter 'eigenvalues' must have shape ({m}, {k}), got "
                f"{tuple(eigenvalues.shape)}."
            )
        if weight_name is None and bias_name is None:
            raise ValueError("Parameters 'weight_name' and 'bias_name' cannot both be None.")
        if weight_transposed and len(weight_shape) != 2:
            raise ValueError(
                "Parameter 'weight_shape' must have two dimensions (d, m) for a transposed "
                f"weight, got {tuple(weight_shape)}."
            )
        rows = tuple(weight_shape[::-1]) if weight_transposed else tuple(weight_shape)
        d = int(torch.Size(rows[1:]).numel())
        expected_k = (d if weight_name is not None else 0) + (1 if bias_name is not None else 0)
        if rows[0] != m or expected_k != k:
            raise ValueError(
                f"Parameter 'weight_shape' {tuple(weight_shape)} does not match factors of sizes "
                f"m={m}, k={k} (bias {'included' if bias_name else 'excluded'})."
            )
        self.method = method
        self.layer_name = layer_name
        self.weight_name = weight_name
        self.bias_name = bias_name
        self.weight_shape = tuple(weight_shape)
        self.weight_transposed = bool(weight_transposed)
        self._dtype = dtype or input_eigenvectors.dtype
        self.eigenvalues = eigenvalues.to(torch.float64)
        self._input_eigenvectors = input_eigenvectors
        self._output_eigenvectors = output_eigenvectors
        self._qa = input_eigenvectors.to(self._dtype)
        self._qg = output_eigenvectors.to(self._dtype)
        self._m, self._k, self._d = m, k, d
        self.factors = factors
        self.eigenbasis = eigenbasis
        self._scale = self.eigenvalues.to(self._dtype)

    @property
    def input_size(self) -> int:
        return self._m * self._k

    @property
    def input_dict_structure(self) -> Dict[str, Tuple[int, ...]]:
        structure: Dict[str, Tuple[int, ...]] = {}
        if self.weight_name is not None:
            structure[self.weight_name] = self.weight_shape
        if self.bias_name is not None:
            structure[self.bias_name] = (self._m,)
        return structure

    @property
    def device(self) -> torch.device:
        return self._qa.device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def input_eigenvectors(self) -> torch.Tensor:
        """$Q_A$, as given."""
        return self._input_eigenvectors

    @property
    def output_eigenvectors(self) -> torch.Tensor:
        """$Q_G$, as given."""
        return self._output_eigenvectors

    def _weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """Weights `(N, ...)` (any layout of `weight_shape`) as matrices `(N, m, d)`."""
        n = weight.shape[0]
        if self.weight_transposed:
            return weight.reshape(n, self._d, self._m).transpose(1, 2)
        return weight.reshape(n, self._m, self._d)

    def _weight_rows(self, matrix: torch.Tensor) -> torch.Tensor:
        """Matrices `(N, m, d)` as weights `(N, *weight_shape)`."""
        if self.weight_transposed:
            matrix = matrix.transpose(1, 2)
        return matrix.reshape(matrix.shape[0], *self.weight_shape)

    def _to_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """Flat rows `(N, P)` to matrices $[W \\mid b]$ `(N, m, k)`."""
        n = tensor.shape[0]
        if self.weight_name is None:
            return tensor.reshape(n, self._m, self._k)
        weight = self._weight_matrix(tensor[:, : self._m * self._d])
        if self.bias_name is None:
            return weight
        bias = tensor[:, self._m * self._d :].reshape(n, self._m, 1)
        return torch.cat([weight, bias], dim=2)

    def _to_flat(self, matrix: torch.Tensor) -> torch.Tensor:
        n = matrix.shape[0]
        if self.weight_name is None:
            return matrix.reshape(n, -1)
        weight = self._weight_rows(matrix[:, :, : self._d]).reshape(n, -1)
        if self.bias_name is None:
            return weight
        return torch.cat([weight, matrix[:, :, self._d]], dim=1)

    def _scale_in_eigenbasis(self, matrix: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        rotated = self._qg.T @ matrix @ self._qa
        return self._qg @ (rotated * scale) @ self._qa.T

    def apply_to_matrices(self, matrices: torch.Tensor) -> torch.Tensor:
        r"""The operator applied to gradients given as matrices $[W \mid b]$ `(N, m, k)`
        (see `matrix_from_flat` of [LayerSpec][influx.torch.kfac.layers.LayerSpec]), without
        the copies of the flat layout and with at most two matrices of that size alive.

        Args:
            matrices: `(N, m, k)`; not modified.

        Returns:
            `(N, m, k)` in the operator's dtype.
        """
        if matrices.ndim != 3 or tuple(matrices.shape[1:]) != (self._m, self._k):
            raise ValueError(
                f"Parameter 'matrices' must have shape (N, {self._m}, {self._k}), got "
                f"{tuple(matrices.shape)}."
            )
        rotated = self._qg.T @ matrices.to(self._dtype)
        return self._scaled_back(rotated @ self._qa)

    def _scaled_back(self, rotated: torch.Tensor) -> torch.Tensor:
        r"""$Q_G (R \odot S) Q_A^\top$ of matrices $R$ `(N, m, k)` in the eigenbasis (scaled
        in place)."""
        rotated *= self._scale
        result = self._qg @ rotated
        del rotated
        return result @ self._qa.T

    def apply_to_signals(self, inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
        r"""The operator applied to the per-sample gradients
        $V_i = \sum_t \delta_{it} \tilde a_{it}^\top$ of a layer, given by its inputs and
        output gradients, in matrix form `(N, m, k)`: rotated into the eigenbasis by the
        cheaper order ([rotated_gradients][influx.torch.kfac.contraction.rotated_gradients],
        without forming $V_i$ where rotating the signals costs less: a `Linear` layer's
        application then takes half the arithmetic), scaled and rotated back as in
        `apply_to_matrices`; equal to `apply_to_matrices` of the formed gradients up to
        rounding.

        Args:
            inputs: $\tilde a$ `(N, T, k)`.
            output_grads: $\delta$ `(N, T, m)`.

        Returns:
            `(N, m, k)` in the operator's dtype.
        """
        m, k = self._m, self._k
        if (
            inputs.ndim != 3
            or output_grads.ndim != 3
            or inputs.shape[:2] != output_grads.shape[:2]
            or inputs.shape[2] != k
            or output_grads.shape[2] != m
        ):
            raise ValueError(
                f"Parameters 'inputs' and 'output_grads' must have shapes (N, T, {k}) and "
                f"(N, T, {m}), got {tuple(inputs.shape)} and {tuple(output_grads.shape)}."
            )
        rotated = rotated_gradients(
            inputs.to(self._dtype), output_grads.to(self._dtype), self._qa, self._qg
        )
        return self._scaled_back(rotated)

    def _apply(self, tensor: torch.Tensor) -> torch.Tensor:
        matrix = self._to_matrix(tensor.to(self._dtype))
        return self._to_flat(self._scale_in_eigenbasis(matrix, self._scale))

    def _apply_to_dict(self, mat: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        n = next(iter(mat.values())).shape[0]
        parts = []
        if self.weight_name is not None:
            parts.append(self._weight_matrix(mat[self.weight_name].to(self._dtype)))
        if self.bias_name is not None:
            parts.append(mat[self.bias_name].to(self._dtype).reshape(n, self._m, 1))
        matrix = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        result = self._scale_in_eigenbasis(matrix, self._scale)
        out: Dict[str, torch.Tensor] = {}
        if self.weight_name is not None:
            out[self.weight_name] = self._weight_rows(result[:, :, : self._d])
        if self.bias_name is not None:
            out[self.bias_name] = result[:, :, -1]
        return out

    def curvature_matrix(self) -> torch.Tensor:
        r"""The dense curvature $Q\,\mathrm{diag}(s)\,Q^\top$ `(P, P)` in the flat parameter
        order, without regularization, in float64. For tests and small layers only."""
        eye = torch.eye(self.input_size, dtype=torch.float64, device=self.device)
        qa = self._input_eigenvectors.to(torch.float64)
        qg = self._output_eigenvectors.to(torch.float64)
        rotated = qg.T @ self._to_matrix(eye) @ qa
        return self._to_flat(qg @ (rotated * self.eigenvalues) @ qa.T)

    def to_dense(self) -> torch.Tensor:
        """The dense curvature `(P, P)` in the operator's dtype."""
        return self.curvature_matrix().to(self._dtype)

    def _layout(self) -> Dict[str, Any]:
        return {
            "weight_name": self.weight_name,
            "weight_shape": list(self.weight_shape),
            "weight_transposed": self.weight_transposed,
            "bias_name": self.bias_name,
            "method": self.method,
            "dtype": str(self._dtype),
            "layer_name": self.layer_name,
        }

    def _state_tensors(self) -> Dict[str, torch.Tensor]:
        tensors = {
            "input_eigenvectors": self._input_eigenvectors,
            "output_eigenvectors": self._output_eigenvectors,
            "eigenvalues": self.eigenvalues,
        }
        if self.factors is not None:
            tensors["input_covariance"] = self.factors.input_covariance
            tensors["output_grad_covariance"] = self.factors.output_grad_covariance
        if self.eigenbasis is not None:
            tensors["input_eigenvalues"] = self.eigenbasis.input_eigenvalues
            tensors["output_eigenvalues"] = self.eigenbasis.output_eigenvalues
        return tensors

    def export_state(self) -> OperatorState:
        settings = self._layout()
        settings["n_samples"] = None if self.factors is None else self.factors.n_samples
        return OperatorState(type(self).__name__, self._state_tensors(), settings)

    @staticmethod
    def _arguments(state: OperatorState) -> Dict[str, Any]:
        t, s = state.tensors, state.settings
        factors = eigenbasis = None
        if "input_covariance" in t:
            factors = KroneckerFactors(
                t["input_covariance"], t["output_grad_covariance"], s["n_samples"]
            )
        if "input_eigenvalues" in t:
            eigenbasis = KroneckerEigenbasis(
                t["input_eigenvalues"],
                t["input_eigenvectors"],
                t["output_eigenvalues"],
                t["output_eigenvectors"],
            )
        return {
            "input_eigenvectors": t["input_eigenvectors"],
            "output_eigenvectors": t["output_eigenvectors"],
            "eigenvalues": t["eigenvalues"],
            "weight_name": s["weight_name"],
            "weight_shape": tuple(s["weight_shape"]),
            "weight_transposed": bool(s.get("weight_transposed", False)),
            "bias_name": s["bias_name"],
            "method": s["method"],
            "dtype": _DTYPES[s["dtype"]],
            "layer_name": s["layer_name"],
            "factors": factors,
            "eigenbasis": eigenbasis,
        }

    @classmethod
    def from_state(
        cls, state: OperatorState, context: StateContext
    ) -> "KroneckerFactoredCurvature":
        return cls(**cls._arguments(state))


class KroneckerFactoredOperator(KroneckerFactoredCurvature):
    r"""$(Q\,\mathrm{diag}(s)\,Q^\top + \lambda I)^{-1}$ for $Q = Q_G \otimes Q_A$, one layer.

    Applied as $V \mapsto Q_G [(Q_G^\top V Q_A) \oslash (s + \lambda)] Q_A^\top$ (see the module
    description). Entries with $s_{jk} + \lambda$ at rounding level are treated as zero
    curvature and get a zero inverse (a pseudo-inverse, with a warning), as for
    [DirectSolveOperator][influx.torch.inverse.direct.DirectSolveOperator].

    Args:
        input_eigenvectors: $Q_A$ `(k, k)`.
        output_eigenvectors: $Q_G$ `(m, m)`.
        eigenvalues: $s$ `(m, k)`, non-negative.
        regularization: $\lambda \ge 0$ or None.
        weight_name: the weight's parameter name, None if the weight is not part of the block.
        weight_shape: the weight's shape (`(m, d)` or `(m, c, kh, kw)`; `(d, m)` for a
            transposed weight).
        bias_name: the bias's parameter name, None if the bias is not part of the block.
        method: `"ekfac"` or `"kfac"`, reported in `diagnostics`.
        dtype: the dtype of inputs and results; default that of the eigenvectors.
        layer_name: the layer's name, for messages and diagnostics.
        factors: the Kronecker factors, if known (kept for inspection).
        eigenbasis: the factors' eigendecompositions, if known (kept for inspection).
        weight_transposed: whether the weight is stored as $W^\top$ `(d, m)`.
        on_nonconvergence: for $s + \lambda$ whose condition number exceeds what the dtype
            resolves (see [influx.torch.curvature.conditioning][influx.torch.curvature.conditioning]):
            `"warn"` (default: log a warning naming $\lambda$ and the smallest safe value,
            report `converged=False`) or `"raise"` (an
            [IllConditionedError][influx.errors.IllConditionedError]).
        warn_on_ill_conditioning: with `"warn"`, log the message at warning level (else at
            debug level: for a preconditioner, whose conditioning CG checks itself).
    """

    supports_regularization = True

    def __init__(
        self,
        input_eigenvectors: torch.Tensor,
        output_eigenvectors: torch.Tensor,
        eigenvalues: torch.Tensor,
        regularization: Optional[float],
        weight_name: Optional[str],
        weight_shape: Tuple[int, ...],
        bias_name: Optional[str] = None,
        method: str = "ekfac",
        dtype: Optional[torch.dtype] = None,
        layer_name: str = "",
        factors: Optional[KroneckerFactors] = None,
        eigenbasis: Optional[KroneckerEigenbasis] = None,
        weight_transposed: bool = False,
        on_nonconvergence: str = "warn",
        warn_on_ill_conditioning: bool = True,
    ):
        validate_regularization(regularization)
        self.on_nonconvergence = check_nonconvergence_policy(on_nonconvergence)
        self.warn_on_ill_conditioning = warn_on_ill_conditioning
        super().__init__(
            input_eigenvectors,
            output_eigenvectors,
            eigenvalues,
            weight_name,
            weight_shape,
            bias_name,
            method,
            dtype,
            layer_name,
            factors,
            eigenbasis,
            weight_transposed,
        )
        self._regularization = regularization
        self._regularization_changed()

    @classmethod
    def from_curvature(
        cls,
        curvature: KroneckerFactoredCurvature,
        regularization: Optional[float],
        on_nonconvergence: str = "warn",
    ) -> "KroneckerFactoredOperator":
        """The inverse of `curvature` plus $\\lambda I$."""
        arguments = cls._arguments(curvature.export_state())
        return cls(regularization=regularization, on_nonconvergence=on_nonconvergence, **arguments)

    @property
    def curvature(self) -> KroneckerFactoredCurvature:
        """The curvature this operator inverts (without regularization)."""
        state = KroneckerFactoredCurvature.export_state(self)
        return KroneckerFactoredCurvature(**self._arguments(state))

    def _regularization_changed(self) -> None:
        shifted = self.eigenvalues + (self._regularization or 0.0)
        tol = float(shifted.abs().max()) * shifted.numel() * torch.finfo(torch.float64).eps
        keep = shifted > tol
        n_zero = int((~keep).sum())
        if n_zero:
            logger.warning(
                "Layer %r: %d of %d Kronecker eigenvalues (plus regularization) are zero up to "
                "rounding; their inverse is set to zero (pseudo-inverse). Increase the "
                "regularization to make the curvature invertible.",
                self.layer_name,
                n_zero,
                shifted.numel(),
            )
        inverse = torch.where(keep, 1.0 / torch.where(keep, shifted, 1.0), 0.0)
        self._scale = inverse.to(self._dtype)
        self.diagnostics = SolverDiagnostics(
            method=self.method,
            converged=n_zero == 0,
            regularization=self._regularization,
            details={
                "layer": self.layer_name,
                "factor_shapes": ((self._k, self._k), (self._m, self._m)),
                "regularization": self._regularization,
                "min_eigenvalue": float(self.eigenvalues.min()),
                "max_eigenvalue": float(self.eigenvalues.max()),
                "n_zero_inverse": n_zero,
            },
        )
        # The condition number of s + λ, the eigenvalues of what is inverted.
        check_eigenvalue_conditioning(
            self.method, shifted, self._regularization, self._dtype,
            getattr(self, "on_nonconvergence", "warn"), self.diagnostics,
            getattr(self, "warn_on_ill_conditioning", True), f"Layer {self.layer_name!r}: ",
        )  # fmt: skip

    def export_state(self) -> OperatorState:
        state = super().export_state()
        state.settings["regularization"] = self._regularization
        state.settings["on_nonconvergence"] = self.on_nonconvergence
        if not self.warn_on_ill_conditioning:
            state.settings["warn_on_ill_conditioning"] = False
        return state

    @classmethod
    def from_state(cls, state: OperatorState, context: StateContext) -> "KroneckerFactoredOperator":
        return cls(
            regularization=state.settings["regularization"],
            on_nonconvergence=state.settings.get("on_nonconvergence", "warn"),
            warn_on_ill_conditioning=state.settings.get("warn_on_ill_conditioning", True),
            **cls._arguments(state),
        )
