"""The public surface of pyDVL 0.10.0's `pydvl.influence`, written out as a contract.

Every public name of the reference tree is listed at its influx path (`pydvl.influence.X` is
`influx.X`), with the parameter names of each function, constructor and public method as the
reference declares them. A name conforms when it can be imported from its path and every
reference parameter binds the same way: the reference parameters are the leading parameters
of ours, in order, and any parameter we add after them has a default. Properties and enum
members must exist. The reference package itself is not imported.

`influx.influence_calculator` (the calculators' path in the reference) is provided by its own
module; until it exists its names are expected failures.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import pytest


class ENUM(tuple):
    """The member names of an enum."""

    def __new__(cls, *members: str) -> "ENUM":
        return super().__new__(cls, members)


VALUE = "value"
"""A type variable or alias: it must be importable."""

Params = Tuple[str, ...]
ClassSpec = Tuple[Optional[Params], Dict[str, Union[str, Params]]]

CONTRACT: Dict[str, Dict[str, Any]] = {
    "influx": {
        "DaskInfluenceCalculator": (
            ("influence_function_model", "converter", "client"),
            {
                "n_parameters": "property",
                "influence_factors": ("x", "y"),
                "influences": ("x_test", "y_test", "x", "y", "mode"),
                "influences_from_factors": ("z_test_factors", "x", "y", "mode"),
            },
        ),
        "DisableClientSingleThreadCheck": (None, {"warning_msg": ()}),
        "InfluenceMode": ENUM("Up", "Perturbation"),
        "SequentialInfluenceCalculator": (
            ("influence_function_model",),
            {
                "influence_factors": ("data_iterable",),
                "influences": ("test_data_iterable", "train_data_iterable", "mode"),
                "influences_from_factors": ("z_test_factors", "train_data_iterable", "mode"),
            },
        ),
    },
    "influx.types": {
        "Batch": (("x", "y"), {}),
        "BatchType": VALUE,
        "BilinearForm": (
            None,
            {
                "inner_prod": ("left", "right"),
                "grads_inner_prod": ("left", "right", "gradient_provider"),
                "mixed_grads_inner_prod": ("left", "right", "gradient_provider"),
            },
        ),
        "BilinearFormType": VALUE,
        "BlockMapper": (
            ("composable_block_dict",),
            {
                "items": (),
                "transformed_grads": ("batch",),
                "interactions": ("left_batch", "right_batch", "mode"),
                "interactions_from_transformed_grads": ("left_factors", "right_batch", "mode"),
                "generate_transformed_grads": ("batch",),
                "generate_interactions": ("left_batch", "right_batch", "mode"),
                "generate_interactions_from_transformed_grads": (
                    "left_factors",
                    "right_batch",
                    "mode",
                ),
            },
        ),
        "BlockMapperType": VALUE,
        "DataLoaderType": VALUE,
        "GradientProvider": (
            None,
            {
                "jacobian_prod": ("batch", "g"),
                "flat_grads": ("batch",),
                "flat_mixed_grads": ("batch",),
            },
        ),
        "GradientProviderType": VALUE,
        "InfluenceMode": ENUM("Up", "Perturbation"),
        "Operator": (
            None,
            {"input_size": "property", "apply": ("tensor",), "as_bilinear_form": ()},
        ),
        "OperatorGradientComposition": (
            ("op", "gp"),
            {
                "interactions": ("left_batch", "right_batch", "mode"),
                "transformed_grads": ("batch",),
                "interactions_from_transformed_grads": ("left_factors", "right_batch", "mode"),
            },
        ),
        "OperatorGradientCompositionType": VALUE,
        "OperatorType": VALUE,
        "TensorType": VALUE,
        "UnsupportedInfluenceModeException": (("mode",), {}),
    },
    "influx.array": {
        "LazyChunkSequence": (
            ("generator_factory", "len_generator"),
            {
                "compute": ("aggregator",),
                "to_zarr": ("path_or_url", "converter", "return_stored", "overwrite"),
            },
        ),
        "ListAggregator": (None, {}),
        "NestedLazyChunkSequence": (
            ("generator_factory", "len_outer_generator"),
            {
                "compute": ("aggregator",),
                "to_zarr": ("path_or_url", "converter", "return_stored", "overwrite"),
            },
        ),
        "NestedListAggregator": (None, {}),
        "NestedSequenceAggregator": (None, {}),
        "NumpyConverter": (None, {"to_numpy": ("x",), "from_numpy": ("x",)}),
        "SequenceAggregator": (None, {}),
    },
    "influx.base_influence_function_model": {
        "ComposableInfluence": (
            None,
            {
                "is_fitted": "property",
                "fit": ("data",),
                "influences_by_block": ("x_test", "y_test", "x", "y", "mode"),
                "influence_factors_by_block": ("x", "y"),
                "influences_from_factors_by_block": ("z_test_factors", "x", "y", "mode"),
                "influences_from_factors": ("z_test_factors", "x", "y", "mode"),
            },
        ),
        "InfluenceFunctionModel": (
            None,
            {
                "n_parameters": "property",
                "is_thread_safe": "property",
                "is_fitted": "property",
                "fit": ("data",),
                "fit_required": ("method",),
                "influence_factors": ("x", "y"),
                "influences": ("x_test", "y_test", "x", "y", "mode"),
                "influences_from_factors": ("z_test_factors", "x", "y", "mode"),
            },
        ),
        "NotImplementedLayerRepresentationException": (("module_id",), {}),
    },
    "influx.influence_calculator": {
        "DaskInfluenceCalculator": (
            ("influence_function_model", "converter", "client"),
            {
                "n_parameters": "property",
                "influence_factors": ("x", "y"),
                "influences": ("x_test", "y_test", "x", "y", "mode"),
                "influences_from_factors": ("z_test_factors", "x", "y", "mode"),
            },
        ),
        "DisableClientSingleThreadCheck": (None, {"warning_msg": ()}),
        "InvalidDimensionChunksError": (("chunks",), {}),
        "SequentialInfluenceCalculator": (
            ("influence_function_model",),
            {
                "influence_factors": ("data_iterable",),
                "influences": ("test_data_iterable", "train_data_iterable", "mode"),
                "influences_from_factors": ("z_test_factors", "train_data_iterable", "mode"),
            },
        ),
        "ThreadSafetyViolationError": ((), {}),
        "UnalignedChunksError": (("chunk_sizes_x", "chunk_sizes_y"), {}),
    },
    "influx.torch": {
        "ArnoldiInfluence": (
            (
                "model",
                "loss",
                "regularization",
                "rank",
                "krylov_dimension",
                "tol",
                "max_iter",
                "eigen_computation_on_gpu",
                "block_structure",
                "second_order_mode",
                "use_woodbury",
            ),
            {"with_regularization": ("regularization",), "is_thread_safe": "property"},
        ),
        "BlockMode": ENUM("LAYER_WISE", "PARAMETER_WISE", "FULL"),
        "CgInfluence": (
            (
                "model",
                "loss",
                "regularization",
                "rtol",
                "atol",
                "maxiter",
                "progress",
                "precompute_grad",
                "preconditioner",
                "solve_simultaneously",
                "warn_on_max_iteration",
                "block_structure",
                "second_order_mode",
            ),
            {"with_regularization": ("regularization",), "is_thread_safe": "property"},
        ),
        "DirectInfluence": (
            ("model", "loss", "regularization", "block_structure", "second_order_mode"),
            {"with_regularization": ("regularization",), "is_thread_safe": "property"},
        ),
        "EkfacInfluence": (
            ("model", "update_diagonal", "hessian_regularization", "progress"),
            {
                "is_fitted": "property",
                "fit": ("data",),
                "influences_by_layer": ("x_test", "y_test", "x", "y", "mode"),
                "influence_factors_by_layer": ("x", "y"),
                "influences_from_factors_by_layer": ("z_test_factors", "x", "y", "mode"),
                "explore_hessian_regularization": ("x", "y", "regularization_values"),
                "to": ("device",),
            },
        ),
        "InverseHarmonicMeanInfluence": (
            ("model", "loss", "regularization", "block_structure"),
            {
                "n_parameters": "property",
                "is_thread_safe": "property",
                "with_regularization": ("regularization",),
            },
        ),
        "JacobiPreconditioner": (
            ("num_samples_estimator",),
            {
                "is_fitted": "property",
                "modify_regularization_requires_fit": "property",
                "to": ("device",),
            },
        ),
        "LissaInfluence": (
            (
                "model",
                "loss",
                "regularization",
                "maxiter",
                "dampen",
                "scale",
                "rtol",
                "progress",
                "warn_on_max_iteration",
                "block_structure",
                "second_order_mode",
            ),
            {"with_regularization": ("regularization",), "is_thread_safe": "property"},
        ),
        "NystroemPreconditioner": (
            ("rank",),
            {
                "low_rank_approx": "property",
                "rank": "property",
                "is_fitted": "property",
                "modify_regularization_requires_fit": "property",
                "to": ("device",),
            },
        ),
        "NystroemSketchInfluence": (
            ("model", "loss", "regularization", "rank", "block_structure", "second_order_mode"),
            {"with_regularization": ("regularization",), "is_thread_safe": "property"},
        ),
        "SecondOrderMode": ENUM("HESSIAN", "GAUSS_NEWTON"),
    },
    "influx.torch.base": {
        "DictBilinearForm": (
            ("operator",),
            {
                "grads_inner_prod": ("left", "right", "gradient_provider"),
                "mixed_grads_inner_prod": ("left", "right", "gradient_provider"),
            },
        ),
        "LowRankBilinearForm": (
            ("operator",),
            {"grads_inner_prod": ("left", "right", "gradient_provider")},
        ),
        "OperatorBilinearForm": (("operator",), {"inner_prod": ("left", "right")}),
        "OperatorBilinearFormType": VALUE,
        "TensorDictOperator": (
            None,
            {"apply_to_dict": ("mat",), "input_dict_structure": "property", "as_bilinear_form": ()},
        ),
        "TensorOperator": (
            None,
            {"device": "property", "dtype": "property", "to": ("device",), "as_bilinear_form": ()},
        ),
        "TorchBatch": (("x", "y"), {"to": ("device",)}),
        "TorchBlockMapper": (("composable_block_dict",), {"to": ("device",)}),
        "TorchComposableInfluence": (
            ("model", "block_structure", "regularization"),
            {
                "block_names": "property",
                "n_parameters": "property",
                "with_regularization": ("regularization",),
                "to": ("device",),
            },
        ),
        "TorchGradientProvider": (
            ("model", "loss", "restrict_to"),
            {
                "to": ("device",),
                "device": "property",
                "dtype": "property",
                "grads": ("batch",),
                "mixed_grads": ("batch",),
                "jacobian_prod": ("batch", "g"),
                "flat_grads": ("batch",),
                "flat_mixed_grads": ("batch",),
            },
        ),
        "TorchOperatorGradientComposition": (("op", "gp"), {"to": ("device",)}),
        "TorchOperatorType": VALUE,
    },
    "influx.torch.batch_operation": {
        "BatchOperationType": VALUE,
        "ChunkAveraging": (None, {"as_dict_averaging": ()}),
        "GaussNewtonBatchOperation": (("model", "loss", "restrict_to"), {"to": ("device",)}),
        "HessianBatchOperation": (("model", "loss", "restrict_to"), {}),
        "InverseHarmonicMeanBatchOperation": (
            ("model", "loss", "regularization", "restrict_to"),
            {"regularization": "property", "to": ("device",)},
        ),
        "PointAveraging": (("batch_dim",), {"as_dict_averaging": ()}),
        "TensorAveragingType": VALUE,
    },
    "influx.torch.functional": {
        "LowRankProductRepresentation": (
            ("eigen_vals", "projections"),
            {"device": "property", "dtype": "property", "to": ("device",)},
        ),
        "create_batch_hvp_function": ("model", "loss", "reverse_only"),
        "create_batch_loss_function": ("model", "loss"),
        "create_empirical_loss_function": ("model", "loss", "data_loader"),
        "create_hvp_function": (
            "model",
            "loss",
            "data_loader",
            "precompute_grad",
            "use_average",
            "reverse_only",
            "track_gradients",
        ),
        "create_matrix_jacobian_product_function": ("model", "loss", "g"),
        "create_per_sample_gradient_function": ("model", "loss"),
        "create_per_sample_loss_function": ("model", "loss"),
        "create_per_sample_mixed_derivative_function": ("model", "loss"),
        "gauss_newton": ("model", "loss", "data_loader", "restrict_to"),
        "hessian": (
            "model",
            "loss",
            "data_loader",
            "use_hessian_avg",
            "track_gradients",
            "restrict_to",
        ),
        "hvp": ("func", "params", "vec", "reverse_only"),
        "model_hessian_nystroem_approximation": (
            "model",
            "loss",
            "data_loader",
            "rank",
            "shift_func",
        ),
        "operator_nystroem_approximation": ("operator", "rank", "shift_func"),
        "operator_spectral_approximation": (
            "operator",
            "rank",
            "krylov_dimension",
            "tol",
            "max_iter",
            "eigen_computation_on_gpu",
        ),
        "randomized_nystroem_approximation": (
            "mat_mat_prod",
            "input_dim",
            "rank",
            "input_type",
            "shift_func",
            "mat_vec_device",
        ),
    },
    "influx.torch.influence_function_model": {
        "ArnoldiInfluence": (
            (
                "model",
                "loss",
                "regularization",
                "rank",
                "krylov_dimension",
                "tol",
                "max_iter",
                "eigen_computation_on_gpu",
                "block_structure",
                "second_order_mode",
                "use_woodbury",
            ),
            {"with_regularization": ("regularization",), "is_thread_safe": "property"},
        ),
        "CgInfluence": (
            (
                "model",
                "loss",
                "regularization",
                "rtol",
                "atol",
                "maxiter",
                "progress",
                "precompute_grad",
                "preconditioner",
                "solve_simultaneously",
                "warn_on_max_iteration",
                "block_structure",
                "second_order_mode",
            ),
            {"with_regularization": ("regularization",), "is_thread_safe": "property"},
        ),
        "DirectInfluence": (
            ("model", "loss", "regularization", "block_structure", "second_order_mode"),
            {"with_regularization": ("regularization",), "is_thread_safe": "property"},
        ),
        "EkfacInfluence": (
            ("model", "update_diagonal", "hessian_regularization", "progress"),
            {
                "is_fitted": "property",
                "fit": ("data",),
                "influences_by_layer": ("x_test", "y_test", "x", "y", "mode"),
                "influence_factors_by_layer": ("x", "y"),
                "influences_from_factors_by_layer": ("z_test_factors", "x", "y", "mode"),
                "explore_hessian_regularization": ("x", "y", "regularization_values"),
                "to": ("device",),
            },
        ),
        "InverseHarmonicMeanInfluence": (
            ("model", "loss", "regularization", "block_structure"),
            {
                "n_parameters": "property",
                "is_thread_safe": "property",
                "with_regularization": ("regularization",),
            },
        ),
        "LissaInfluence": (
            (
                "model",
                "loss",
                "regularization",
                "maxiter",
                "dampen",
                "scale",
                "rtol",
                "progress",
                "warn_on_max_iteration",
                "block_structure",
                "second_order_mode",
            ),
            {"with_regularization": ("regularization",), "is_thread_safe": "property"},
        ),
        "NystroemSketchInfluence": (
            ("model", "loss", "regularization", "rank", "block_structure", "second_order_mode"),
            {"with_regularization": ("regularization",), "is_thread_safe": "property"},
        ),
        "TorchInfluenceFunctionModel": (
            ("model", "loss"),
            {
                "model_dtype": "property",
                "n_parameters": "property",
                "is_thread_safe": "property",
                "model_device": "property",
                "model_params": "property",
                "influences": ("x_test", "y_test", "x", "y", "mode"),
                "influence_factors": ("x", "y"),
                "influences_from_factors": ("z_test_factors", "x", "y", "mode"),
                "to": ("device",),
            },
        ),
    },
    "influx.torch.operator": {
        "CgOperator": (
            (
                "operator",
                "regularization",
                "rtol",
                "atol",
                "maxiter",
                "progress",
                "preconditioner",
                "use_block_cg",
                "warn_on_max_iteration",
            ),
            {
                "regularization": "property",
                "device": "property",
                "dtype": "property",
                "to": ("device",),
                "input_size": "property",
            },
        ),
        "DirectSolveOperator": (
            ("matrix", "regularization", "in_place_regularization"),
            {
                "regularization": "property",
                "device": "property",
                "dtype": "property",
                "to": ("device",),
                "input_size": "property",
            },
        ),
        "GaussNewtonOperator": (("model", "loss", "dataloader", "restrict_to"), {}),
        "HessianOperator": (("model", "loss", "dataloader", "restrict_to"), {}),
        "InverseHarmonicMeanOperator": (
            ("model", "loss", "dataloader", "regularization", "restrict_to"),
            {"regularization": "property"},
        ),
        "LissaOperator": (
            (
                "batch_operation",
                "data",
                "regularization",
                "maxiter",
                "dampen",
                "scale",
                "rtol",
                "progress",
                "warn_on_max_iteration",
            ),
            {
                "regularization": "property",
                "device": "property",
                "dtype": "property",
                "to": ("device",),
                "input_size": "property",
            },
        ),
        "LowRankOperator": (
            ("low_rank_representation", "regularization", "exact"),
            {
                "exact": "property",
                "regularization": "property",
                "low_rank_representation": "property",
                "device": "property",
                "dtype": "property",
                "to": ("device",),
                "input_size": "property",
                "as_bilinear_form": (),
            },
        ),
        "MatrixOperator": (
            ("matrix",),
            {
                "device": "property",
                "dtype": "property",
                "to": ("device",),
                "input_size": "property",
            },
        ),
    },
    "influx.torch.preconditioner": {
        "JacobiPreconditioner": (
            ("num_samples_estimator",),
            {
                "is_fitted": "property",
                "modify_regularization_requires_fit": "property",
                "to": ("device",),
            },
        ),
        "NystroemPreconditioner": (
            ("rank",),
            {
                "low_rank_approx": "property",
                "rank": "property",
                "is_fitted": "property",
                "modify_regularization_requires_fit": "property",
                "to": ("device",),
            },
        ),
        "Preconditioner": (
            None,
            {
                "regularization": "property",
                "modify_regularization_requires_fit": "property",
                "is_fitted": "property",
                "fit": ("operator", "regularization"),
                "solve": ("rhs",),
                "to": ("device",),
            },
        ),
    },
    "influx.torch.util": {
        "BlockMode": ENUM("LAYER_WISE", "PARAMETER_WISE", "FULL"),
        "EkfacRepresentation": (
            ("layer_names", "layers_module", "evecs_a", "evecs_g", "diags"),
            {"get_layer_evecs": (), "to": ("device",)},
        ),
        "LossType": VALUE,
        "ModelInfoMixin": (
            ("model",),
            {"device": "property", "dtype": "property", "n_parameters": "property"},
        ),
        "ModelParameterDictBuilder": (
            ("model", "detach"),
            {"build": ("block_structure",), "build_from_block_mode": ("block_mode",)},
        ),
        "NestedTorchCatAggregator": (None, {}),
        "SecondOrderMode": ENUM("HESSIAN", "GAUSS_NEWTON"),
        "TorchCatAggregator": (None, {}),
        "TorchLinalgEighException": (("original_exception",), {}),
        "TorchNumpyConverter": (("device",), {"to_numpy": ("x",), "from_numpy": ("x",)}),
        "TorchTensorContainerType": VALUE,
        "align_structure": ("source", "target"),
        "align_with_model": ("x", "model"),
        "empirical_cross_entropy_loss_fn": ("model_output", "args", "kwargs"),
        "flatten_dimensions": ("tensors", "shape", "concat_at"),
        "get_model_parameters": ("model", "detach", "require_grad_only"),
        "reshape_vector_to_tensors": ("input_vector", "target_shapes"),
        "safe_torch_linalg_eigh": ("args", "kwargs"),
        "to_model_device": ("x", "model"),
        "torch_dataset_to_dask_array": ("dataset", "chunk_size", "total_size", "resulting_dtype"),
    },
}


def _cases() -> List[Any]:
    cases = []
    for module, names in CONTRACT.items():
        for name, spec in names.items():
            cases.append(pytest.param(module, name, spec, id=f"{module}.{name}"))
    return cases


def _binding_problem(expected: Params, obj: Callable[..., Any]) -> Optional[str]:
    parameters = [
        p for p in inspect.signature(obj).parameters.values() if p.name not in ("self", "cls")
    ]
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    named = [p for p in parameters if p.kind not in variadic]
    wanted = [name for name in expected if name not in ("args", "kwargs")]
    if [p.name for p in named[: len(wanted)]] != wanted:
        return f"expected leading parameters {wanted}, got {[p.name for p in named]}"
    required = [p.name for p in named[len(wanted) :] if p.default is inspect.Parameter.empty]
    if required:
        return f"additional parameters {required} have no default"
    if ("args" in expected) and not any(
        p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters
    ):
        return "expected *args"
    return None


@pytest.mark.parametrize("module, name, spec", _cases())
def test_public_name_conforms(module: str, name: str, spec: Any) -> None:
    obj = getattr(importlib.import_module(module), name)
    if spec == VALUE:
        return
    if isinstance(spec, ENUM):
        assert [m for m in spec if not hasattr(obj, m)] == []
        return
    if isinstance(spec, tuple) and all(isinstance(p, str) for p in spec):
        assert _binding_problem(spec, obj) is None, _binding_problem(spec, obj)
        return
    init, members = spec
    assert inspect.isclass(obj)
    if init is not None:
        assert _binding_problem(init, obj) is None, _binding_problem(init, obj)
    for member, member_spec in members.items():
        assert hasattr(obj, member), f"{name}.{member} is missing"
        if member_spec == "property":
            continue
        problem = _binding_problem(member_spec, getattr(obj, member))
        assert problem is None, f"{name}.{member}: {problem}"


def test_contract_size() -> None:
    """121 (module, name) pairs, 106 distinct names."""
    pairs = [(m, n) for m, names in CONTRACT.items() for n in names]
    assert len(pairs) == 121
    assert len({n for _, n in pairs}) == 106


def test_import_change_is_the_only_change() -> None:
    """The one-line migration: the reference's top-level names come from `influx.torch`."""
    from influx.torch import (  # noqa: F401
        ArnoldiInfluence,
        BlockMode,
        CgInfluence,
        DirectInfluence,
        EkfacInfluence,
        InverseHarmonicMeanInfluence,
        JacobiPreconditioner,
        LissaInfluence,
        NystroemPreconditioner,
        NystroemSketchInfluence,
        SecondOrderMode,
    )
