"""The layer map of influx: the one place that says which layer every module belongs to.

`tests/test_architecture.py` checks the source against it (every module is in a layer and
imports only modules of its own layer or of layers below) and checks that the chart of
`docs/architecture.md` names every entry in the same layer. An entry is a module, or a package
of `WHOLE_PACKAGES` (covering every module inside it). A role package's `__init__` that imports
nothing needs no entry. Layers are listed from the bottom up.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

LAYERS: List[Tuple[str, List[str]]] = [
    (
        "protocols",
        [
            "influx.types",
            "influx.errors",
            "influx.ordering",
            "influx.twice_differentiable",
            "influx.inversion",
            "influx.base_influence_function_model",
        ],
    ),
    ("structures", ["influx.torch.data.structures"]),
    (
        "autodiff",
        [
            "influx.torch.autodiff.stateless",
            "influx.torch.autodiff.model_call",
            "influx.torch.autodiff.per_sample",
            "influx.torch.autodiff.derivatives",
            "influx.torch.autodiff.hessian_products",
        ],
    ),
    (
        "data",
        [
            "influx.torch.data.batches",
            "influx.torch.data.task",
            "influx.torch.data.causal_lm",
            "influx.torch.data.blocks",
            "influx.torch.data.validation",
            "influx.torch.data.regularization",
            "influx.torch.data.state",
            "influx.torch.data.preparation",
        ],
    ),
    ("gradients", ["influx.torch.gradients.provider", "influx.torch.gradients.bilinear"]),
    (
        "curvature",
        [
            "influx.torch.curvature.averaging",
            "influx.torch.curvature.batch_operation",
            "influx.torch.curvature.tensor_operator",
            "influx.torch.curvature.generalized_gauss_newton",
            "influx.torch.curvature.operators",
            "influx.torch.curvature.conditioning",
        ],
    ),
    (
        "kfac",
        [
            "influx.torch.kfac.layers",
            "influx.torch.kfac.factors",
            "influx.torch.kfac.contraction",
            "influx.torch.kfac.signals",
            "influx.torch.kfac.operators",
            "influx.torch.kfac.preconditioner",
        ],
    ),
    (
        "inverse",
        [
            "influx.torch.inverse.solution",
            "influx.torch.inverse.direct",
            "influx.torch.inverse.cg",
            "influx.torch.inverse.lissa",
            "influx.torch.inverse.spectrum",
            "influx.torch.inverse.conditioning",
            "influx.torch.inverse.damping",
            "influx.torch.inverse.sketch",
            "influx.torch.inverse.low_rank_approximation",
            "influx.torch.inverse.low_rank",
            "influx.torch.inverse.inverse_harmonic_mean",
            "influx.torch.inverse.preconditioner",
            "influx.torch.inverse.ekfac_preconditioner",
        ],
    ),
    (
        "composition",
        [
            "influx.torch.composition.curvatures",
            "influx.torch.composition.solvers",
            "influx.torch.composition.block_mapper",
            "influx.torch.composition.fit_checks",
            "influx.torch.composition.persistence",
            "influx.torch.composition.per_token",
            "influx.torch.composition.heads",
            "influx.torch.composition.chunking",
            "influx.torch.composition.composable",
            "influx.torch.kfac.scoring",
            "influx.torch.kfac.query",
            "influx.torch.projection.random_matrices",
            "influx.torch.projection.projections",
            "influx.torch.projection.gradients",
            "influx.torch.projection.distortion",
        ],
    ),
    ("models", ["influx.torch.models"]),
    (
        "calculators",
        [
            "influx.array",
            "influx.calculator",
            "influx.influence_calculator",
            "influx.torch.data.array_converters",
            "influx.evaluation",
        ],
    ),
    (
        "workflows",
        [
            "influx.torch.workflows.valuation",
            "influx.torch.workflows.gradient_store",
            "influx.torch.workflows.tracker_state",
            "influx.torch.workflows.tracker_report",
            "influx.torch.workflows.tracker_store",
            "influx.torch.workflows.checkpoint_averaging",
            "influx.torch.workflows.tracker",
            "influx.integrations",
            "influx.torch.legacy.structures",
            "influx.torch.legacy.inversion_methods",
            "influx.torch.legacy.data_functional",
        ],
    ),
    (
        "pyDVL paths",
        [
            "influx.torch",
            "influx.torch.base",
            "influx.torch.batch_operation",
            "influx.torch.functional",
            "influx.torch.influence_function_model",
            "influx.torch.operator",
            "influx.torch.preconditioner",
            "influx.torch.twice_differentiable",
            "influx.torch.util",
        ],
    ),
    ("cli", ["influx.cli", "influx.__main__", "influx"]),
]

WHOLE_PACKAGES = {
    "influx.array",
    "influx.calculator",
    "influx.cli",
    "influx.evaluation",
    "influx.integrations",
    "influx.torch.models",
}
"""Package entries that cover every module inside them; any other entry covers one module."""

PLANNED: set = set()
"""Places reserved for packages being added; an entry here may match no module yet."""


def layer_index() -> Dict[str, int]:
    """Entry -> position of its layer, from 0 at the bottom."""
    return {entry: i for i, (_, entries) in enumerate(LAYERS) for entry in entries}


def entry_of(module: str, entries: Dict[str, int]) -> str:
    """The entry covering `module`: itself, or the package of `WHOLE_PACKAGES` holding it; ""
    if none does."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in entries and (n == len(parts) or candidate in WHOLE_PACKAGES):
            return candidate
    return ""
