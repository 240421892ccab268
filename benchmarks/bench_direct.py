"""DirectInfluence: influx against the reference library (pyDVL 0.10.0) on the same workloads.

For each workload and thread count, times `fit` (the dense Hessian of the mean training loss
and its factorisation) and `influences` for a (64 test x 1000 train) matrix, in float32, each
library in its own fresh process on bit-identical weights and data; reports medians, the
ratio reference / influx (above 1: influx is faster), the peak resident memory increase and
the relative error of each library against an exact float64 solve. A float64 run of each
library then checks that both compute the same matrix as the exact solve.

The ~100k-parameter MLP is not part of this benchmark: its dense Hessian alone would need
about 40 GB in float32 (80 GB in float64).

Usage (from the repository root):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_direct.py [--repeats 5] [--readme]
"""

from __future__ import annotations

import argparse
import logging
from typing import Dict, List, Optional

from common import (
    WORKLOADS,
    Case,
    CaseResult,
    exact_influences,
    machine_note,
    markdown_table,
    reference_python,
    relative_error,
    replace_readme_section,
    run_case,
)

logger = logging.getLogger("bench_direct")

DEFAULT_WORKLOADS = ["logreg_breast_cancer", "mlp_small_digits"]
CLASS_NAME = "DirectInfluence"


def _fmt(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def _ratio(ref: Optional[float], ours: float) -> str:
    return "-" if ref is None else f"{ref / ours:.2f}x"


def timing_rows(
    workloads: List[str], threads: List[int], repeats: Dict[str, int], with_ref: bool
) -> List[List[str]]:
    rows = []
    for name in workloads:
        exact = exact_influences(WORKLOADS[name])
        for n_threads in threads:
            results: Dict[str, CaseResult] = {}
            libraries = ["influx", "pydvl"] if with_ref else ["influx"]
            for library in libraries:
                case = Case(library, CLASS_NAME, name, threads=n_threads, repeats=repeats[name])
                logger.info("running %s", case)
                results[library] = run_case(case)
            ours, ref = results["influx"], results.get("pydvl")
            total_ours = ours.fit_median + ours.influence_median
            total_ref = None if ref is None else ref.fit_median + ref.influence_median
            rows.append(
                [
                    name,
                    str(WORKLOADS[name].n_parameters),
                    str(ours.threads_used),
                    f"{_fmt(ours.fit_median)} / {_fmt(ref.fit_median) if ref else '-'}",
                    _ratio(ref.fit_median if ref else None, ours.fit_median),
                    f"{_fmt(ours.influence_median)} / {_fmt(ref.influence_median) if ref else '-'}",
                    _ratio(ref.influence_median if ref else None, ours.influence_median),
                    _ratio(total_ref, total_ours),
                    f"{ours.peak_mb:.0f} / {f'{ref.peak_mb:.0f}' if ref else '-'}",
                    f"{relative_error(ours.matrix(), exact):.1e} / "
                    f"{f'{relative_error(ref.matrix(), exact):.1e}' if ref else '-'}",
                ]
            )
            print(markdown_table(TIMING_HEADER, rows[-1:]).splitlines()[-1], flush=True)
    return rows


TIMING_HEADER = [
    "workload",
    "parameters",
    "threads",
    "fit s (influx / ref)",
    "fit speed-up",
    "influences s (influx / ref)",
    "influences speed-up",
    "total speed-up",
    "peak MB (influx / ref)",
    "rel. error vs exact (influx / ref)",
]


def accuracy_rows(workloads: List[str], with_ref: bool) -> List[List[str]]:
    rows = []
    for name in workloads:
        exact = exact_influences(WORKLOADS[name])
        errors = []
        for library in ["influx", "pydvl"] if with_ref else ["influx"]:
            case = Case(library, CLASS_NAME, name, dtype="float64", repeats=1)
            errors.append(f"{relative_error(run_case(case).matrix(), exact):.1e}")
        rows.append([name, *errors] + ([] if with_ref else ["-"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS))
    parser.add_argument("--threads", default="1,0", help="comma-separated; 0 means torch's default")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument(
        "--fast-repeats", type=int, default=20, help="timed runs for the logistic regression"
    )
    parser.add_argument("--no-ref", action="store_true", help="do not run the reference")
    parser.add_argument("--readme", action="store_true", help="write the tables to README.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    workloads = [w for w in args.workloads.split(",") if w]
    for name in workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}; known: {sorted(WORKLOADS)}")
        if WORKLOADS[name].n_parameters > 20_000:
            parser.error(f"workload {name!r}: the dense Hessian does not fit in memory")
    threads = [int(t) for t in args.threads.split(",")]
    repeats = {
        name: args.fast_repeats if WORKLOADS[name].n_parameters < 100 else args.repeats
        for name in workloads
    }
    with_ref = not args.no_ref and reference_python() is not None
    if not with_ref:
        logger.warning("Reference library not available: timing influx alone.")

    note = machine_note()
    print(f"\nDirectInfluence, float32, medians ({note})\n", flush=True)
    print(markdown_table(TIMING_HEADER, []), flush=True)
    timing = timing_rows(workloads, threads, repeats, with_ref)
    accuracy = accuracy_rows(workloads, with_ref)
    accuracy_header = ["workload", "influx rel. error (float64)", "ref rel. error (float64)"]
    text = (
        f"Measured {note}; float32, medians of {args.repeats} runs "
        f"({args.fast_repeats} for the logistic regression) after one warm-up run.\n\n"
        + markdown_table(TIMING_HEADER, timing)
        + "\n\nThe same workloads in float64 (one run), relative error against the exact "
        "float64 solve:\n\n" + markdown_table(accuracy_header, accuracy)
    )
    print("\n" + text)
    if args.readme:
        replace_readme_section("bench_direct", text)


if __name__ == "__main__":
    main()
