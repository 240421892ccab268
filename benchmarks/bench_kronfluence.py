"""EK-FAC and K-FAC: influx against Kronfluence 1.0.1, in the same run.

Four models, float32, one torch thread, $\\lambda = 0.01$ on both sides:

- `logreg`: the logistic regression of `common.py`'s `logreg_breast_cancer` workload (a
  `Linear(30, 1)` on the standardised breast cancer data, binary cross-entropy on logits,
  its trained weights), fitted on its 505 training points and scored against 1,000 (the
  training set cycled, as in `common.py`);
- `mlp` and `cnn`: the digits MLP 64-32-10 and the small CNN of `bench_ekfac.py`, trained
  there, fitted on 1,000 training digits and scored against them;
- `mlp100k`: the MLP 64-300-256-10 of `common.py`'s `mlp_100k_digits` workload (99,126
  parameters, its trained weights), fitted on its first 1,000 training points and scored
  against them.

`--strategies ekfac,kfac` chooses the curvature: EK-FAC (influx `update_diagonal=True`,
Kronfluence `strategy="ekfac"`) and K-FAC (`update_diagonal=False`, `strategy="kfac"`). The
empirical Fisher on both sides (training labels; Kronfluence's `use_empirical_fisher=True`
with a summed loss, influx's default), or with `--fisher sampled` the true Fisher (labels
drawn from the model's softmax on both sides, one fit per seed of `--seeds`; cross-entropy
models with at most 20,000 parameters only). Each library runs in a fresh process: after a
warm-up, the peak resident memory added by one fit and by one scoring is sampled every 50
microseconds (the median of three), then fit (the factors and, for EK-FAC, the eigenvalue
refit, batches of 128) and scoring (a 64 x 1,000 matrix) are timed `--repeats` times
(medians). Pearson and Spearman correlations are against the exact Gauss-Newton (empirical
Fisher) influences in float64: of influx's `DirectInfluence` up to 20,000 parameters, and
for the 100k MLP through the Woodbury identity in the space of the $n$ fitting points, which
needs no $P \\times P$ matrix (`woodbury_gn_influences`; `--check-woodbury` compares both
forms on the digits MLP). For the sampled Fisher they are against the exact generalized
Gauss-Newton influences (mean and standard deviation over the seeds, and the mean Pearson
correlation between the seeds' matrices). The last column is the relative Frobenius
difference between the two libraries' score matrices.

Kronfluence stores its factors and scores on disk (a temporary directory here); its times
include that, as they would for a user. It runs in its own virtual environment
(``--kron-python``, default ``$INFLUX_KRON_PYTHON`` else ``.venv-kron/bin/python``):

    python -m venv .venv-kron
    .venv-kron/bin/pip install torch==2.13.0
    .venv-kron/bin/pip install --no-deps kronfluence==1.0.1 accelerate safetensors einops \\
        einconv opt_einsum

Usage (from the repository root; the `logreg` and `mlp100k` models are trained once by
`common.py` and cached, see `common.prepare`):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_kronfluence.py [--repeats 5]
    PYTHONPATH=src .venv/bin/python benchmarks/bench_kronfluence.py \\
        --models logreg,mlp,mlp100k,cnn --strategies ekfac,kfac --repeats 3
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
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
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
MODELS = ("logreg", "mlp", "mlp100k", "cnn")
STRATEGIES = ("ekfac", "kfac")
COMMON_WORKLOADS = {"logreg": "logreg_breast_cancer", "mlp100k": "mlp_100k_digits"}
"""The models taken from `common.py`'s workloads (trained weights cached by `common.prepare`)."""
MAX_DENSE_PARAMETERS = 20_000
"""Above this many parameters the exact influences go through `woodbury_gn_influences`."""


def build_model(kind: str) -> torch.nn.Module:
    """The untrained architecture of model `kind` (one of `MODELS`)."""
    if kind in COMMON_WORKLOADS:
        return common.WORKLOADS[COMMON_WORKLOADS[kind]].build_model()
    if kind in ("mlp", "cnn"):
        return make_model(kind)
    raise ValueError(f"Parameter 'kind' must be one of {list(MODELS)}, got {kind!r}.")


def loss_function(kind: str) -> Callable[..., torch.Tensor]:
    """The training loss of model `kind`, mean reduction."""
    if kind == "logreg":
        return torch.nn.functional.binary_cross_entropy_with_logits
    return torch.nn.functional.cross_entropy


def _subset(data: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    x, y = data["x"][:N_SCORE_TRAIN], data["y"][:N_SCORE_TRAIN]
    return {
        "x": x,
        "y": y,
        "x_score": x,
        "y_score": y,
        "x_test": data["x_test"][:N_SCORE_TEST],
        "y_test": data["y_test"][:N_SCORE_TEST],
    }


def load_model_and_data(
    kind: str, digits: Dict[str, torch.Tensor]
) -> Tuple[torch.nn.Module, Dict[str, torch.Tensor]]:
    """The trained float32 model `kind` and its data: the fitting points `x`, `y`, the
    training points scored `x_score`, `y_score` and the 64 test points."""
    if kind not in COMMON_WORKLOADS:
        return train(kind, digits), _subset(digits)
    workload = common.WORKLOADS[COMMON_WORKLOADS[kind]]
    common.prepare(workload)
    model, data = common.load_workload(workload, torch.float32)
    return model, {
        "x": data["x_train"][:N_SCORE_TRAIN],
        "y": data["y_train"][:N_SCORE_TRAIN],
        "x_score": data["x_infl"],
        "y_score": data["y_infl"],
        "x_test": data["x_test"][:N_SCORE_TEST],
        "y_test": data["y_test"][:N_SCORE_TEST],
    }


def _float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.double() if tensor.is_floating_point() else tensor


def exact_gn_influences(
    model: torch.nn.Module, data: Dict[str, torch.Tensor], kind: str
) -> np.ndarray:
    """The influences through the exact Gauss-Newton (empirical Fisher) matrix of the fitting
    points, in float64: influx's `DirectInfluence` (the reference of `bench_ekfac.py`) up to
    `MAX_DENSE_PARAMETERS` parameters, else `woodbury_gn_influences`."""
    if sum(p.numel() for p in model.parameters()) > MAX_DENSE_PARAMETERS:
        return woodbury_gn_influences(model, data, loss_function(kind))
    if kind in ("mlp", "cnn"):
        return exact_influences(model, data)
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    from influx.torch import DirectInfluence, SecondOrderMode

    model64 = copy.deepcopy(model).double()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(_float64(data["x"]), _float64(data["y"])), batch_size=BATCH
    )
    direct = DirectInfluence(
        model64,
        loss_function(kind),
        LAMBDA,
        second_order_mode=SecondOrderMode.GAUSS_NEWTON,
    ).fit(loader)
    test = (_float64(data["x_test"]), _float64(data["y_test"]))
    values = direct.influences(*test, _float64(data["x_score"]), _float64(data["y_score"]))
    return values.numpy()  # type: ignore[no-any-return]


def _flat_per_sample_gradients(
    model: torch.nn.Module,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    chunk: int = 100,
) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    params = {name: p.detach() for name, p in model.named_parameters()}

    def sample_loss(
        theta: Dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
    ) -> torch.Tensor:
        return loss(functional_call(model, theta, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    rows = []
    for start in range(0, len(x), chunk):
        grads = per_sample(params, x[start : start + chunk], y[start : start + chunk])
        rows.append(torch.cat([grads[name].reshape(len(grads[name]), -1) for name in params], 1))
    return torch.cat(rows)


def woodbury_gn_influences(
    model: torch.nn.Module,
    data: Dict[str, torch.Tensor],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> np.ndarray:
    r"""The exact Gauss-Newton (empirical Fisher) influences in float64 without a
    $P \times P$ matrix.

    With $G \in \mathbb{R}^{n \times P}$ the per-sample gradients of the $n$ fitting points
    (of the per-sample loss; the mean-loss convention of `DirectInfluence`), the Woodbury
    identity in the space of the fitting points gives

    $$
    \Big(\tfrac1n G^\top G + \lambda I\Big)^{-1}
    = \tfrac{1}{\lambda}\Big(I - G^\top (n\lambda I + G G^\top)^{-1} G\Big),
    $$

    so with $T$ the test gradients and $S$ those of the points scored, the influences are
    $\frac1\lambda\big(T S^\top - (T G^\top)(n\lambda I + G G^\top)^{-1}(G S^\top)\big)$:
    an $n \times n$ solve and products with $G$ ($n P$ float64 numbers, held in memory).
    """
    model64 = copy.deepcopy(model).double().eval()
    fit = _flat_per_sample_gradients(model64, loss, _float64(data["x"]), _float64(data["y"]))
    test = _flat_per_sample_gradients(
        model64, loss, _float64(data["x_test"]), _float64(data["y_test"])
    )
    if data["x_score"] is data["x"] or (
        data["x_score"].shape == data["x"].shape
        and bool((data["x_score"] == data["x"]).all())
        and bool((data["y_score"] == data["y"]).all())
    ):
        scored = fit
    else:
        scored = _flat_per_sample_gradients(
            model64, loss, _float64(data["x_score"]), _float64(data["y_score"])
        )
    n = fit.shape[0]
    system = fit @ fit.T
    system.diagonal().add_(n * LAMBDA)
    correction = (test @ fit.T) @ torch.linalg.solve(system, fit @ scored.T)
    return ((test @ scored.T - correction) / LAMBDA).numpy()  # type: ignore[no-any-return]


def check_woodbury(digits: Dict[str, torch.Tensor]) -> float:
    """The largest difference between `woodbury_gn_influences` and `DirectInfluence`'s
    exact influences on the digits MLP, relative to the largest influence."""
    model, data = load_model_and_data("mlp", digits)
    dense = exact_influences(model, data)
    woodbury = woodbury_gn_influences(model, data, loss_function("mlp"))
    return float(np.abs(woodbury - dense).max() / np.abs(dense).max())


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
        data["x_test"].double(), data["y_test"], data["x_score"].double(), data["y_score"]
    )
    return values.numpy()  # type: ignore[no-any-return]


def influx_runner(
    model: torch.nn.Module,
    data: Dict[str, torch.Tensor],
    workdir: str,
    fisher: str,
    seed: int,
    kind: str,
    strategy: str,
) -> Any:
    sys.path.insert(0, str(HERE.parents[1] / "src"))
    from influx.torch import EkfacInfluence

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"], data["y"]), batch_size=BATCH
    )
    state: Dict[str, Any] = {}

    def fit() -> None:
        state["model"] = EkfacInfluence(
            model,
            update_diagonal=strategy == "ekfac",
            hessian_regularization=LAMBDA,
            loss=loss_function(kind),
            fisher=fisher,
            seed=seed,
        ).fit(loader)

    def score() -> torch.Tensor:
        test_and_scored = (data["x_test"], data["y_test"], data["x_score"], data["y_score"])
        return state["model"].influences(*test_and_scored)  # type: ignore[no-any-return]

    return fit, score


def kronfluence_runner(
    model: torch.nn.Module,
    data: Dict[str, torch.Tensor],
    workdir: str,
    fisher: str,
    seed: int,
    kind: str,
    strategy: str,
) -> Any:
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    logging.disable(logging.WARNING)
    loss = loss_function(kind)

    class Classification(Task):  # type: ignore[misc]
        def compute_train_loss(self, batch: Any, model: Any, sample: bool = False) -> Any:
            inputs, labels = batch
            outputs = model(inputs)
            if sample:  # the true Fisher: labels drawn from the model's predictive distribution
                with torch.no_grad():
                    probabilities = torch.softmax(outputs.detach(), dim=-1)
                    labels = torch.multinomial(probabilities, 1).reshape(-1)
            return loss(outputs, labels, reduction="sum")

        def compute_measurement(self, batch: Any, model: Any) -> Any:
            inputs, labels = batch
            return loss(model(inputs), labels, reduction="sum")

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
    scored_set = torch.utils.data.TensorDataset(data["x_score"], data["y_score"])
    test_set = torch.utils.data.TensorDataset(data["x_test"], data["y_test"])
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=fisher == "empirical")
    score_args = ScoreArguments(damping_factor=LAMBDA)

    def fit() -> None:
        torch.manual_seed(seed)
        analyzer.fit_all_factors(
            factors_name=strategy,
            dataset=train_set,
            per_device_batch_size=BATCH,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )

    def score() -> torch.Tensor:
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name=strategy,
            query_dataset=test_set,
            train_dataset=scored_set,
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
    model = build_model(args.model)
    model.load_state_dict(payload["state"])
    model.eval()
    runner = influx_runner if args.library == "influx" else kronfluence_runner
    result: Dict[str, Any] = {"fit": [], "score": []}
    with tempfile.TemporaryDirectory() as workdir:
        fit, score = runner(model, data, workdir, args.fisher, args.seed, args.model, args.strategy)
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
    strategy: str,
    payload: str,
    args: argparse.Namespace,
    seed: int,
    tmp: str,
) -> Dict[str, Any]:
    """Times and scores of one library in a fresh process, then (for the first seed) its peak
    memory in another, with the allocator settings of `MALLOC_ENV`."""
    result = _run(python, library, kind, strategy, payload, args, seed, tmp, "time")
    if args.fisher == "empirical" or seed == int(args.seeds.split(",")[0]):
        result.update(_run(python, library, kind, strategy, payload, args, seed, tmp, "memory"))
    return result


def _run(
    python: str,
    library: str,
    kind: str,
    strategy: str,
    payload: str,
    args: argparse.Namespace,
    seed: int,
    tmp: str,
    phase: str,
) -> Dict[str, Any]:
    out = os.path.join(tmp, f"{library}-{kind}-{strategy}-{seed}-{phase}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if phase == "memory":
        env.update(MALLOC_ENV)
    cmd = [python, str(HERE), "--worker", "--library", library, "--model", kind]
    cmd += ["--payload", payload, "--repeats", str(args.repeats), "--out", out]
    cmd += ["--fisher", args.fisher, "--seed", str(seed), "--phase", phase]
    cmd += ["--strategy", strategy]
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
    parser.add_argument("--strategy", default="ekfac", help=argparse.SUPPRESS)
    parser.add_argument("--payload", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="mlp,cnn", help=f"comma-separated, of {MODELS}")
    parser.add_argument("--strategies", default="ekfac", help=f"comma-separated, of {STRATEGIES}")
    parser.add_argument("--fisher", default="empirical", choices=["empirical", "sampled"])
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="time", help=argparse.SUPPRESS)
    parser.add_argument("--seeds", default="0", help="label-sampling seeds (sampled Fisher)")
    parser.add_argument(
        "--check-woodbury",
        action="store_true",
        help="compare the Woodbury form of the exact influences with DirectInfluence's on "
        "the digits MLP, then exit",
    )
    parser.add_argument(
        "--kron-python",
        default=os.environ.get("INFLUX_KRON_PYTHON", ".venv-kron/bin/python"),
        help="Kronfluence's interpreter (relative paths: from the repository root)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    models = args.models.split(",")
    strategies = args.strategies.split(",")
    for name, values, allowed in (
        ("models", models, MODELS),
        ("strategies", strategies, STRATEGIES),
    ):
        unknown = [value for value in values if value not in allowed]
        if unknown:
            raise ValueError(f"Option --{name} takes values of {list(allowed)}, got {unknown}.")
    if args.fisher == "sampled" and {"logreg", "mlp100k"} & set(models):
        raise ValueError(
            "Option --fisher sampled supports the cross-entropy models with an exact generalized "
            f"Gauss-Newton reference (mlp, cnn), got --models {args.models}."
        )
    digits = load_data()
    if args.check_woodbury:
        print(f"Woodbury against DirectInfluence, digits MLP: {check_woodbury(digits):.3e}")
        return
    pythons = {"influx": sys.executable, "kronfluence": str(HERE.parents[1] / args.kron_python)}
    seeds = [int(seed) for seed in args.seeds.split(",")] if args.fisher == "sampled" else [0]
    lines = [
        "| model | strategy | library | fit s | score s (64 x 1000) | peak MB fit / score | "
        "Pearson | Spearman | kronfluence / influx time, fit / score | difference from influx |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in models:
            model, data = load_model_and_data(kind, digits)
            if args.fisher == "sampled":
                exact = exact_ggn_influences(model, data)
            else:
                exact = exact_gn_influences(model, data, kind)
            payload = os.path.join(tmp, f"{kind}.pt")
            torch.save({"state": model.state_dict(), "data": data}, payload)
            for strategy in strategies:
                results = {
                    library: [
                        run_worker(python, library, kind, strategy, payload, args, seed, tmp)
                        for seed in seeds
                    ]
                    for library, python in pythons.items()
                }
                for library, runs in results.items():
                    lines.append(_row(kind, strategy, library, runs, results["influx"], exact))
                    print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))


def _row(
    kind: str,
    strategy: str,
    library: str,
    runs: List[Dict[str, Any]],
    ours: List[Dict[str, Any]],
    exact: np.ndarray,
) -> str:
    """One table row: medians of the first seed's times, its memory, the accuracy over the
    seeds and the mean relative difference of the seeds' matrices from influx's."""
    result = runs[0]
    fit, score = statistics.median(result["fit"]), statistics.median(result["score"])
    if library == "influx":
        ratio, difference = "1.00 / 1.00", "0"
    else:
        ratio = (
            f"{fit / statistics.median(ours[0]['fit']):.2f} / "
            f"{score / statistics.median(ours[0]['score']):.2f}"
        )
        gaps = [
            np.linalg.norm(run["matrix"] - reference["matrix"])
            / np.linalg.norm(reference["matrix"])
            for run, reference in zip(runs, ours)
        ]
        difference = f"{np.mean(gaps):.1e}"
    return (
        f"| {kind} | {strategy} | {library} | {fit:.4f} | {score:.4f} | "
        f"{result['fit_mb']:.1f} / {result['score_mb']:.1f} | "
        f"{_accuracy([run['matrix'] for run in runs], exact)} | {ratio} | {difference} |"
    )


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
