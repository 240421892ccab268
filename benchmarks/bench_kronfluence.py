"""EK-FAC: influx against Kronfluence 1.0.1, in the same run.

The models of `bench_ekfac.py` (the digits MLP 64-32-10 and the small CNN, trained there),
float32, one torch thread, $\\lambda = 0.01$ on both sides, the empirical Fisher on both sides
(training labels; Kronfluence's `use_empirical_fisher=True` with a summed loss, influx's
default), or with `--fisher sampled` the true Fisher (labels drawn from the model's softmax on
both sides, one fit per seed of `--seeds`). Each library runs in a fresh process: after a
warm-up, the peak resident memory added by one fit and by one scoring is sampled every
millisecond (the median of three scorings), then fit (the factors and the eigenvalue refit,
batches of 128 over 1,000 training points) and scoring (a 64 x 1,000 matrix) are timed
`--repeats` times (medians). Pearson and Spearman correlations are against the exact
Gauss-Newton (empirical Fisher) influences of influx's `DirectInfluence` in float64, or for
the sampled Fisher against the exact generalized Gauss-Newton influences (mean and standard
deviation over the seeds, and the mean Pearson correlation between the seeds' matrices).

Kronfluence stores its factors and scores on disk (a temporary directory here); its times
include that, as they would for a user. It runs in its own virtual environment
(``--kron-python``, default ``$INFLUX_KRON_PYTHON`` else ``.venv-kron/bin/python``):

    python -m venv .venv-kron
    .venv-kron/bin/pip install torch==2.13.0
    .venv-kron/bin/pip install --no-deps kronfluence==1.0.1 accelerate safetensors einops \\
        einconv opt_einsum

Usage (from the repository root):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_kronfluence.py [--repeats 5]
    PYTHONPATH=src .venv/bin/python benchmarks/bench_kronfluence.py --fisher sampled --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
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
    correlations,
    current_rss_bytes,
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


def exact_ggn_influences(model: torch.nn.Module, data: Dict[str, torch.Tensor]) -> np.ndarray:
    """The influences through the exact generalized Gauss-Newton matrix, in float64."""
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    from influx.torch import DirectInfluence, SecondOrderMode

    model64 = copy.deepcopy(model).double()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"].double(), data["y"]), batch_size=BATCH
    )
    direct = DirectInfluence(
        model64,
        torch.nn.functional.cross_entropy,
        LAMBDA,
        second_order_mode=SecondOrderMode.GENERALIZED_GAUSS_NEWTON,
    ).fit(loader)
    values = direct.influences(
        data["x_test"].double(), data["y_test"], data["x"].double(), data["y"]
    )
    return values.numpy()  # type: ignore[no-any-return]


def influx_runner(
    model: torch.nn.Module, data: Dict[str, torch.Tensor], workdir: str, fisher: str, seed: int
) -> Any:
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    from influx.torch import EkfacInfluence

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"], data["y"]), batch_size=BATCH
    )
    state: Dict[str, Any] = {}

    def fit() -> None:
        state["model"] = EkfacInfluence(
            model, update_diagonal=True, hessian_regularization=LAMBDA, fisher=fisher, seed=seed
        ).fit(loader)

    def score() -> torch.Tensor:
        return state["model"].influences(data["x_test"], data["y_test"], data["x"], data["y"])  # type: ignore[no-any-return]

    return fit, score


def kronfluence_runner(
    model: torch.nn.Module, data: Dict[str, torch.Tensor], workdir: str, fisher: str, seed: int
) -> Any:
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    logging.disable(logging.WARNING)

    class Classification(Task):  # type: ignore[misc]
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Any:
            inputs, labels = batch
            outputs = model(inputs)
            if sample:  # the true Fisher: labels drawn from the model's predictive distribution
                with torch.no_grad():
                    probabilities = torch.softmax(outputs.detach(), dim=-1)
                    labels = torch.multinomial(probabilities, 1).reshape(-1)
            return torch.nn.functional.cross_entropy(outputs, labels, reduction="sum")

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
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=fisher == "empirical")
    score_args = ScoreArguments(damping_factor=LAMBDA)

    def fit() -> None:
        torch.manual_seed(seed)
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


SAMPLER = """
import select
import sys
path = f"/proc/{sys.argv[1]}/statm"
peak = 0
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0.00005)[0]:
    with open(path) as f:
        peak = max(peak, int(f.read().split()[1]))
with open(path) as f:
    peak = max(peak, int(f.read().split()[1]))
print(peak, flush=True)
"""

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
"""glibc settings of the memory workers: every allocation of 64 KiB or more is mapped and
returned to the system when freed, and free memory at the top of the heap is returned, so
that the resident set follows the memory in use (by default the thresholds adapt to the
allocations seen, and what a warm-up freed is reused without showing in the resident set)."""


class ResidentPeak:
    """The peak resident memory of this process above the level at entry, sampled every 50
    microseconds by another process (independent of this process's interpreter lock)."""

    def __enter__(self) -> "ResidentPeak":
        self.sampler = subprocess.Popen(
            [sys.executable, "-c", SAMPLER, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.sampler.stdout is not None
        self.sampler.stdout.readline()  # ready
        self.base = current_rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        output, _ = self.sampler.communicate("stop\n", timeout=60)
        self.peak = int(output.split()[-1]) * resource.getpagesize()

    @property
    def megabytes(self) -> float:
        return max(0, self.peak - self.base) / 2**20


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
        fit, score = runner(model, data, workdir, args.fisher, args.seed)
        fit()
        values = score()  # warm-up
        if args.phase == "memory":
            fit_mb, score_mb = [], []
            for _ in range(3):
                with ResidentPeak() as fit_memory:
                    fit()
                fit_mb.append(fit_memory.megabytes)
                with ResidentPeak() as score_memory:
                    score()
                score_mb.append(score_memory.megabytes)
            memory = {"fit_mb": statistics.median(fit_mb), "score_mb": statistics.median(score_mb)}
            Path(args.out + ".json").write_text(json.dumps(memory))
            return
        for _ in range(args.repeats):
            start = time.perf_counter()
            fit()
            result["fit"].append(time.perf_counter() - start)
            start = time.perf_counter()
            values = score()
            result["score"].append(time.perf_counter() - start)
    np.save(args.out + ".npy", values.detach().double().numpy())
    Path(args.out + ".json").write_text(json.dumps(result))


def run_worker(
    python: str,
    library: str,
    kind: str,
    payload: str,
    args: argparse.Namespace,
    seed: int,
    tmp: str,
) -> Dict[str, Any]:
    """Times and scores of one library in a fresh process, then (for the first seed) its peak
    memory in another, with the allocator settings of `MALLOC_ENV`."""
    result = _run(python, library, kind, payload, args, seed, tmp, "time")
    if args.fisher == "empirical" or seed == int(args.seeds.split(",")[0]):
        result.update(_run(python, library, kind, payload, args, seed, tmp, "memory"))
    return result


def _run(
    python: str,
    library: str,
    kind: str,
    payload: str,
    args: argparse.Namespace,
    seed: int,
    tmp: str,
    phase: str,
) -> Dict[str, Any]:
    out = os.path.join(tmp, f"{library}-{kind}-{seed}-{phase}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if phase == "memory":
        env.update(MALLOC_ENV)
    cmd = [python, str(HERE), "--worker", "--library", library, "--model", kind]
    cmd += ["--payload", payload, "--repeats", str(args.repeats), "--out", out]
    cmd += ["--fisher", args.fisher, "--seed", str(seed), "--phase", phase]
    subprocess.run(cmd, check=True, env=env)
    result: Dict[str, Any] = json.loads(Path(out + ".json").read_text())
    if phase == "time":
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
    parser.add_argument("--fisher", default="empirical", choices=["empirical", "sampled"])
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="time", help=argparse.SUPPRESS)
    parser.add_argument("--seeds", default="0", help="label-sampling seeds (sampled Fisher)")
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
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.fisher == "sampled" else [0]
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
            if args.fisher == "sampled":
                exact = exact_ggn_influences(model, data)
            else:
                exact = exact_influences(model, data)
            payload = os.path.join(tmp, f"{kind}.pt")
            torch.save({"state": model.state_dict(), "data": data}, payload)
            results = {
                library: [
                    run_worker(python, library, kind, payload, args, seed, tmp) for seed in seeds
                ]
                for library, python in pythons.items()
            }
            ours = results["influx"][0]
            for library, runs in results.items():
                result = runs[0]
                fit, score = statistics.median(result["fit"]), statistics.median(result["score"])
                ratio = (
                    f"{fit / statistics.median(ours['fit']):.2f} / "
                    f"{score / statistics.median(ours['score']):.2f}"
                    if library != "influx"
                    else "1.00 / 1.00"
                )
                lines.append(
                    f"| {kind} | {library} | {fit:.4f} | {score:.4f} | "
                    f"{result['fit_mb']:.1f} / {result['score_mb']:.1f} | "
                    f"{_accuracy([run['matrix'] for run in runs], exact)} | {ratio} |"
                )
            print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


def _accuracy(matrices: List[np.ndarray], exact: np.ndarray) -> str:
    """Pearson and Spearman against `exact` (mean +/- std over several matrices, with the mean
    Pearson correlation between them), as two table cells."""
    values = np.array([correlations(matrix, exact) for matrix in matrices])
    if len(matrices) == 1:
        return f"{values[0, 0]:.3f} | {values[0, 1]:.3f}"
    pairs = [
        correlations(matrices[i], matrices[j])[0]
        for i in range(len(matrices))
        for j in range(i + 1, len(matrices))
    ]
    mean, std = values.mean(axis=0), values.std(axis=0)
    return (
        f"{mean[0]:.3f} +/- {std[0]:.3f} (seeds agree {np.mean(pairs):.3f}) | "
        f"{mean[1]:.3f} +/- {std[1]:.3f}"
    )


if __name__ == "__main__":
    main()
