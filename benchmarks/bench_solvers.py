"""Iterative and low-rank solvers: influx against the reference library (pyDVL 0.10.0).

For each method (CG, LiSSA, Arnoldi, Nystroem sketch, inverse harmonic mean) and workload,
times `fit` and `influences` for a (64 test x 1000 train) matrix in float32, each library in
its own fresh process on bit-identical weights and data with the same solver settings, and
reports medians, the ratio reference / influx (above 1: influx is faster), the peak resident
memory increase and the relative Frobenius error of each library's matrix.

On the two small workloads the error is against the exact float64 solve of the harness. The
~100k-parameter MLP has no dense Hessian (it would take 40 GB), hence no exact reference: its
error column is left empty. Cases run at one torch thread by default (`--threads 1,0` adds
torch's default count on the small workloads).

Usage (from the repository root):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_solvers.py [--readme]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from typing import Any, Dict, List, Optional

from common import (
    WORKLOADS,
    Case,
    CaseResult,
    exact_influences,
    load_workload,
    machine_note,
    markdown_table,
    prepare,
    reference_python,
    relative_error,
    replace_readme_section,
    run_case,
)

import torch

logger = logging.getLogger("bench_solvers")

DEFAULT_WORKLOADS = ["logreg_breast_cancer", "mlp_small_digits", "mlp_100k_digits"]
LARGE = "mlp_100k_digits"


@dataclasses.dataclass
class Method:
    """A solver with the same settings for both libraries (`kwargs`), plus per-library extras."""

    label: str
    class_name: str
    kwargs: Dict[str, Any]
    influx_extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    ref_extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


def top_eigenvalue(workload_name: str, iterations: int = 20) -> float:
    """Largest eigenvalue of the full-data Hessian of the mean training loss (power iteration
    with Hessian-vector products in float64), to choose LiSSA's scale."""
    from torch.func import functional_call, grad, jvp

    model, data = load_workload(WORKLOADS[workload_name], torch.float64)
    loss = WORKLOADS[workload_name].loss
    params = {n: p.detach() for n, p in model.named_parameters()}

    def mean_loss(p: Dict[str, torch.Tensor]) -> torch.Tensor:
        return loss(functional_call(model, p, (data["x_train"],)), data["y_train"])

    def hvp(v: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return jvp(grad(mean_loss), (params,), (v,))[1]

    gen = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in params.items()}
    value = 0.0
    for _ in range(iterations):
        norm = math.sqrt(sum(float((t**2).sum()) for t in v.values()))
        v = {n: t / norm for n, t in v.items()}
        hv = hvp(v)
        value = sum(float((hv[n] * v[n]).sum()) for n in v)
        v = hv
    return value


def methods_for(workload_name: str, lissa_scale: float) -> List[Method]:
    large = workload_name == LARGE
    quiet = {"warn_on_max_iteration": False}
    # The reference solves the 64 right-hand sides one after the other, a pass over the data
    # per iteration and right-hand side: CG's budget is kept small to bound its run time.
    cg_maxiter = {"logreg_breast_cancer": 100, "mlp_small_digits": 20, LARGE: 5}[workload_name]
    lissa_maxiter = 20 if large else 100
    methods = [
        Method(
            f"CG (rtol 1e-4, maxiter {cg_maxiter})",
            "CgInfluence",
            {"rtol": 1e-4, "atol": 0.0, "maxiter": cg_maxiter, **quiet},
        ),
        # rtol below float32 resolution: both libraries run all `maxiter` iterations, one
        # mini-batch of 256 points each, so they do the same work.
        Method(
            f"LiSSA ({lissa_maxiter} it., scale {lissa_scale:g})",
            "LissaInfluence",
            {
                "maxiter": lissa_maxiter,
                "scale": lissa_scale,
                "dampen": 0.0,
                "rtol": 1e-12,
                **quiet,
            },
        ),
    ]
    ranks = [10] if large else [10, 50]
    if workload_name == "logreg_breast_cancer":
        ranks = [10]
    for rank in ranks:
        methods.append(
            Method(
                f"Arnoldi (rank {rank})",
                "ArnoldiInfluence",
                {"rank": rank, "krylov_dimension": 2 * rank + 10},
            )
        )
    for rank in ranks:
        methods.append(Method(f"Nystroem (rank {rank})", "NystroemSketchInfluence", {"rank": rank}))
    methods.append(Method("inverse harmonic mean", "InverseHarmonicMeanInfluence", {}))
    return methods


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def _ratio(ref: Optional[float], ours: float) -> str:
    return "-" if ref is None else f"{ref / ours:.2f}x"


HEADER = [
    "workload",
    "method",
    "threads",
    "fit s (influx / ref)",
    "influences s (influx / ref)",
    "total speed-up",
    "peak MB (influx / ref)",
    "rel. error (influx / ref)",
    "influx error at most the reference's",
]


def run(
    workloads: List[str], threads: List[int], repeats: Dict[str, int], with_ref: bool
) -> List[List[str]]:
    rows = []
    for name in workloads:
        # No dense Hessian for the 100k MLP: no exact reference, no error column.
        exact = None if name == LARGE else exact_influences(WORKLOADS[name])
        lam = WORKLOADS[name].regularization
        scale = float(f"{1.5 * (top_eigenvalue(name) + lam):.2g}")
        for method in methods_for(name, scale):
            for n_threads in threads:
                if name == LARGE and n_threads != threads[0]:
                    continue
                results: Dict[str, CaseResult] = {}
                for library in ["influx", "pydvl"] if with_ref else ["influx"]:
                    extra = method.influx_extra if library == "influx" else method.ref_extra
                    case = Case(
                        library,
                        method.class_name,
                        name,
                        kwargs={**method.kwargs, **extra},
                        threads=n_threads,
                        # the reference's CG takes minutes per run on the MLPs
                        repeats=1 if method.class_name == "CgInfluence" else repeats[name],
                    )
                    logger.info("running %s", case)
                    results[library] = run_case(case)
                ours, ref = results["influx"], results.get("pydvl")
                total_ours = ours.fit_median + ours.influence_median
                total_ref = None if ref is None else ref.fit_median + ref.influence_median
                ours_err = "-" if exact is None else f"{relative_error(ours.matrix(), exact):.1e}"
                ref_err = (
                    "-"
                    if ref is None or exact is None
                    else f"{relative_error(ref.matrix(), exact):.1e}"
                )
                # errors printed to two digits: equal when they print the same
                at_most = (
                    "-"
                    if "-" in (ours_err, ref_err)
                    else ("yes" if float(ours_err) <= float(ref_err) else "no")
                )
                rows.append(
                    [
                        name,
                        method.label,
                        str(ours.threads_used),
                        f"{_fmt(ours.fit_median)} / {_fmt(ref.fit_median) if ref else '-'}",
                        f"{_fmt(ours.influence_median)} / "
                        f"{_fmt(ref.influence_median) if ref else '-'}",
                        _ratio(total_ref, total_ours),
                        f"{ours.peak_mb:.0f} / {f'{ref.peak_mb:.0f}' if ref else '-'}",
                        f"{ours_err} / {ref_err}",
                        at_most,
                    ]
                )
                print(markdown_table(HEADER, rows[-1:]).splitlines()[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS))
    parser.add_argument("--threads", default="1", help="comma-separated; 0 means torch's default")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument(
        "--large-repeats", type=int, default=1, help="timed runs on the 100k-parameter MLP"
    )
    parser.add_argument("--no-ref", action="store_true", help="do not run the reference")
    parser.add_argument("--readme", action="store_true", help="write the table to README.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    workloads = [w for w in args.workloads.split(",") if w]
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
        prepare(WORKLOADS[name])
    threads = [int(t) for t in args.threads.split(",")]
    repeats = {name: args.large_repeats if name == LARGE else args.repeats for name in workloads}
    with_ref = not args.no_ref and reference_python() is not None
    if not with_ref:
        logger.warning("Reference library not available: timing influx alone.")

    note = machine_note()
    print(f"\nSolvers, float32, medians ({note})\n", flush=True)
    print(markdown_table(HEADER, []), flush=True)
    rows = run(workloads, threads, repeats, with_ref)
    text = (
        f"Measured {note}; float32, medians of {args.repeats} runs ({args.large_repeats} on "
        f"`{LARGE}` and for CG) after one warm-up run, at one thread.\n\n"
        + markdown_table(HEADER, rows)
    )
    print("\n" + text)
    if args.readme:
        replace_readme_section("bench_solvers", text)


if __name__ == "__main__":
    main()
