"""EK-FAC: influx against Kronfluence 1.0.1, in the same run.

The models of `bench_ekfac.py` (the digits MLP 64-32-10 and the small CNN, trained there),
float32, one torch thread, $\\lambda = 0.01$ on both sides, the empirical Fisher on both sides
(training labels; Kronfluence's `use_empirical_fisher=True` with a summed loss, influx's
default). Each library runs in a fresh process: after a warm-up, the peak resident memory
added by one fit and by one scoring is sampled every millisecond, then fit (the factors and
the eigenvalue refit, batches of 128 over 1,000 training points) and scoring (a 64 x 1,000
matrix) are timed `--repeats` times (medians). Pearson and Spearman correlations are against
the exact Gauss-Newton (empirical Fisher) influences of influx's `DirectInfluence` in float64.

Kronfluence stores its factors and scores on disk (a temporary directory here); its times
include that, as they would for a user. It runs in its own virtual environment
(``--kron-python``, default ``$INFLUX_KRON_PYTHON`` else ``.venv-kron/bin/python``):

    python -m venv .venv-kron
    .venv-kron/bin/pip install torch==2.13.0
    .venv-kron/bin/pip install --no-deps kronfluence==1.0.1 accelerate safetensors einops \\
        einconv opt_einsum

Usage (from the repository root):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_kronfluence.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from bench_ekfac import (  # noqa: E402
    LAMBDA,
    PeakMemory,
    correlations,
    exact_influences,
    load_data,
    make_model,
    train,
)

N_SCORE_TEST = 64
N_SCORE_TRAIN = 1000
BATCH = 128


def _subset(data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {
        "x": data["x"][:N_SCORE_TRAIN],
        "y": data["y"][:N_SCORE_TRAIN],
        "x_test": data["x_test"][:N_SCORE_TEST],
        "y_test": data["y_test"][:N_SCORE_TEST],
    }


def influx_runner(model: torch.nn.Module, data: Dict[str, torch.Tensor], workdir: str) -> Any:
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    from influx.torch import EkfacInfluence

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"], data["y"]), batch_size=BATCH
    )
    state: Dict[str, Any] = {}

    def fit() -> None:
        state["model"] = EkfacInfluence(
            model, update_diagonal=True, hessian_regularization=LAMBDA
        ).fit(loader)

    def score() -> torch.Tensor:
        return state["model"].influences(data["x_test"], data["y_test"], data["x"], data["y"])  # type: ignore[no-any-return]

    return fit, score


def kronfluence_runner(model: torch.nn.Module, data: Dict[str, torch.Tensor], workdir: str) -> Any:
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    logging.disable(logging.WARNING)

    class Classification(Task):  # type: ignore[misc]
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Any:
            inputs, labels = batch
            return torch.nn.functional.cross_entropy(model(inputs), labels, reduction="sum")

        def compute_measurement(self, batch: Any, model: Any) -> Any:
            inputs, labels = batch
            return torch.nn.functional.cross_entropy(model(inputs), labels, reduction="sum")

    task = Classification()
    prepared = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name="bench",
        model=prepared,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=workdir,
        disable_model_save=True,
    )
    train_set = torch.utils.data.TensorDataset(data["x"], data["y"])
    test_set = torch.utils.data.TensorDataset(data["x_test"], data["y_test"])
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    score_args = ScoreArguments(damping_factor=LAMBDA)

    def fit() -> None:
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=train_set,
            per_device_batch_size=BATCH,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )

    def score() -> torch.Tensor:
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name="ekfac",
            query_dataset=test_set,
            train_dataset=train_set,
            per_device_query_batch_size=N_SCORE_TEST,
            per_device_train_batch_size=BATCH,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("scores")["all_modules"]  # type: ignore[no-any-return]

    return fit, score


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    payload = torch.load(args.payload, weights_only=False)
    data = payload["data"]
    model = make_model(args.model)
    model.load_state_dict(payload["state"])
    model.eval()
    runner = influx_runner if args.library == "influx" else kronfluence_runner
    result: Dict[str, Any] = {"fit": [], "score": []}
    with tempfile.TemporaryDirectory() as workdir:
        fit, score = runner(model, data, workdir)
        fit()
        score()  # warm-up
        with PeakMemory() as fit_memory:
            fit()
        with PeakMemory() as score_memory:
            values = score()
        result["fit_mb"], result["score_mb"] = fit_memory.megabytes, score_memory.megabytes
        for _ in range(args.repeats):
            start = time.perf_counter()
            fit()
            result["fit"].append(time.perf_counter() - start)
            start = time.perf_counter()
            values = score()
            result["score"].append(time.perf_counter() - start)
    np.save(args.out + ".npy", values.detach().double().numpy())
    Path(args.out + ".json").write_text(json.dumps(result))


def run_worker(python: str, library: str, kind: str, payload: str, repeats: int, tmp: str):
    out = os.path.join(tmp, f"{library}-{kind}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [python, str(HERE), "--worker", "--library", library, "--model", kind]
    cmd += ["--payload", payload, "--repeats", str(repeats), "--out", out]
    subprocess.run(cmd, check=True, env=env)
    result: Dict[str, Any] = json.loads(Path(out + ".json").read_text())
    result["matrix"] = np.load(out + ".npy")
    return result


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", default="influx")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--payload", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument(
        "--kron-python",
        default=os.environ.get("INFLUX_KRON_PYTHON", ".venv-kron/bin/python"),
        help="Kronfluence's interpreter (relative paths: from the repository root)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    pythons = {"influx": sys.executable, "kronfluence": str(HERE.parents[1] / args.kron_python)}
    full = load_data()
    lines = [
        "| model | library | fit s | score s (64 x 1000) | peak MB fit / score | Pearson | "
        "Spearman | kronfluence / influx time, fit / score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            model = train(kind, full)
            data = _subset(full)
            exact = exact_influences(model, data)
            payload = os.path.join(tmp, f"{kind}.pt")
            torch.save({"state": model.state_dict(), "data": data}, payload)
            results = {
                library: run_worker(python, library, kind, payload, args.repeats, tmp)
                for library, python in pythons.items()
            }
            ours = results["influx"]
            for library, result in results.items():
                fit, score = statistics.median(result["fit"]), statistics.median(result["score"])
                pearson, spearman = correlations(result["matrix"], exact)
                ratio = (
                    f"{fit / statistics.median(ours['fit']):.2f} / "
                    f"{score / statistics.median(ours['score']):.2f}"
                    if library != "influx"
                    else "1.00 / 1.00"
                )
                lines.append(
                    f"| {kind} | {library} | {fit:.4f} | {score:.4f} | "
                    f"{result['fit_mb']:.1f} / {result['score_mb']:.1f} | {pearson:.3f} | "
                    f"{spearman:.3f} | {ratio} |"
                )
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
