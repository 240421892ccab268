"""CG preconditioners on the digits MLP: iteration counts for the Hessian and the GGN.

On the harness's `mlp_small_digits` workload (MLP 64-32-10 with tanh, 2,410 parameters,
1,733 training points, trained in float64 with L2 strength 1e-2), solves
$(C + \\lambda I) x = g$ with `CgInfluence` for the gradients $g$ of the first test points,
in float64 with a fixed relative tolerance, for

* the curvature $C$: the Hessian and the generalized Gauss-Newton matrix (GGN);
* $\\lambda \\in \\{10^{-3}, 10^{-2}, 10^{-1}\\}$;
* no preconditioner, Jacobi (Hutchinson diagonal, 20 probes), Nystroem (rank 50), EK-FAC
  on the empirical Fisher (the default) and EK-FAC on the sampled (true) Fisher.

With `--diagnose` it also reports, per layer, how far the EK-FAC curvature is from the
curvature it preconditions (relative Frobenius error of the dense per-layer matrices) and
the condition numbers of $C + \\lambda I$ with and without the preconditioner.

It reports the CG iterations (the maximum over the right-hand sides), whether every
right-hand side converged, and the wall time of the preconditioner's fit and of the solve.
The training data is one batch, so that one CG iteration is one curvature-vector product
over the whole training set.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/cg_preconditioners.py [--readme] [--diagnose]
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Dict, List, Optional, Tuple

from common import (
    WORKLOADS,
    load_workload,
    machine_note,
    markdown_table,
    prepare,
    replace_readme_section,
)
from torch.utils.data import DataLoader, TensorDataset

import torch
from influx.torch import (
    CgInfluence,
    EkfacPreconditioner,
    JacobiPreconditioner,
    NystroemPreconditioner,
    Preconditioner,
    SecondOrderMode,
)
from influx.torch.operator import curvature_operator

logger = logging.getLogger("cg_preconditioners")

WORKLOAD = "mlp_small_digits"
REGULARIZATIONS = (1e-3, 1e-2, 1e-1)
CURVATURES = {
    "Hessian": SecondOrderMode.HESSIAN,
    "GGN": SecondOrderMode.GENERALIZED_GAUSS_NEWTON,
}
RTOL = 1e-6
MAXITER = 300
N_RHS = 8
NYSTROEM_RANK = 50
JACOBI_SAMPLES = 20


def preconditioners() -> Dict[str, Optional[Preconditioner]]:
    return {
        "none": None,
        "Jacobi": JacobiPreconditioner(num_samples_estimator=JACOBI_SAMPLES),
        "Nystroem": NystroemPreconditioner(rank=NYSTROEM_RANK),
        "EK-FAC": EkfacPreconditioner(seed=0),
        "EK-FAC sampled": EkfacPreconditioner(fisher="sampled", seed=0),
    }


def run_one(
    model: torch.nn.Module,
    data: DataLoader,
    x: torch.Tensor,
    y: torch.Tensor,
    mode: SecondOrderMode,
    lam: float,
    pre: Optional[Preconditioner],
) -> Tuple[int, bool, float, float]:
    """Iterations, convergence, fit seconds and solve seconds of one CG solve."""
    torch.manual_seed(0)
    influence = CgInfluence(
        model,
        torch.nn.functional.cross_entropy,
        lam,
        rtol=RTOL,
        atol=0.0,
        maxiter=MAXITER,
        preconditioner=pre,
        warn_on_max_iteration=False,
        second_order_mode=mode,
    )
    start = time.perf_counter()
    influence.fit(data)
    fitted = time.perf_counter()
    influence.influence_factors(x, y)
    solved = time.perf_counter()
    diagnostics = influence.solver_diagnostics["model"]
    assert diagnostics is not None and diagnostics.iterations is not None
    return diagnostics.iterations, diagnostics.converged, fitted - start, solved - fitted


def diagnose(model: torch.nn.Module, data: DataLoader) -> str:
    """Per layer: relative Frobenius error of EK-FAC against the curvature, and the condition
    numbers of $C + \\lambda I$ and $P^{-1/2}(C + \\lambda I)P^{-1/2}$."""
    rows: List[List[str]] = []
    for layer in ("0", "2"):
        restrict = {k: p for k, p in model.named_parameters() if k.startswith(f"{layer}.")}
        for label, mode in (("GN", SecondOrderMode.GAUSS_NEWTON), *CURVATURES.items()):
            operator = curvature_operator(
                mode, model, torch.nn.functional.cross_entropy, data, restrict
            )
            dense = operator.to_dense()
            eye = torch.eye(len(dense), dtype=dense.dtype)
            for lam in REGULARIZATIONS[:2]:
                pre = EkfacPreconditioner(seed=0).fit(operator, lam)
                inverse = pre.solve(eye)
                inverse = (inverse + inverse.T) / 2
                approx = torch.linalg.inv(inverse) - lam * eye
                error = float(torch.linalg.norm(approx - dense) / torch.linalg.norm(dense))
                plain = torch.linalg.eigvalsh(dense + lam * eye)
                root = torch.linalg.cholesky(inverse)
                conditioned = torch.linalg.eigvalsh(root.T @ (dense + lam * eye) @ root)
                rows.append(
                    [
                        layer,
                        label,
                        f"{lam:g}",
                        f"{error:.2f}",
                        f"{float(plain[-1] / plain[0]):.3g}",
                        f"{float(conditioned[-1] / conditioned[0]):.3g}",
                    ]
                )
    header = ["layer", "curvature", "λ", "EK-FAC rel. error", "κ plain", "κ EK-FAC"]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", action="store_true", help="update benchmarks/README.md")
    parser.add_argument(
        "--diagnose", action="store_true", help="per-layer EK-FAC error and condition numbers"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    workload = WORKLOADS[WORKLOAD]
    prepare(workload)
    model, tensors = load_workload(workload, torch.float64)
    x_train, y_train = tensors["x_train"], tensors["y_train"]
    data = DataLoader(TensorDataset(x_train, y_train), batch_size=len(x_train))
    x, y = tensors["x_test"][:N_RHS], tensors["y_test"][:N_RHS]
    if args.diagnose:
        print(diagnose(model, data))
        return

    rows: List[List[str]] = []
    for label, mode in CURVATURES.items():
        for lam in REGULARIZATIONS:
            cells = [label, f"{lam:g}"]
            times = []
            for name, pre in preconditioners().items():
                iterations, converged, fit_s, solve_s = run_one(model, data, x, y, mode, lam, pre)
                logger.info(
                    "%s lambda=%g %s: %d iterations%s, fit %.2f s, solve %.2f s",
                    label,
                    lam,
                    name,
                    iterations,
                    "" if converged else " (not converged)",
                    fit_s,
                    solve_s,
                )
                cells.append(str(iterations) if converged else f"not conv. ({MAXITER})")
                times.append(f"{fit_s + solve_s:.1f}")
            rows.append(cells + [" / ".join(times)])
    header = [
        "curvature",
        "λ",
        "plain",
        "Jacobi",
        "Nyström (r=50)",
        "EK-FAC (empirical)",
        "EK-FAC (sampled)",
        "time s (same order)",
    ]
    table = markdown_table(header, rows)
    note = (
        f"Measured {machine_note()}; float64, one thread, rtol {RTOL:g}, {N_RHS} right-hand "
        f"sides, maxiter {MAXITER}. Iterations are the maximum over the right-hand sides; "
        "times include the preconditioner's fit."
    )
    print(note)
    print()
    print(table)
    if args.readme:
        replace_readme_section("cg_preconditioners", f"{note}\n\n{table}")


if __name__ == "__main__":
    main()
