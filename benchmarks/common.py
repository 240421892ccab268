"""Shared benchmark harness: workloads, training, exact references and an isolated case runner.

A *case* is one (library, influence class, workload, thread count, dtype) combination. It
runs in a fresh Python process (influx's interpreter with `PYTHONPATH=src`, the reference
library's own interpreter for pyDVL; see `influx_python` and `reference_python`), which loads a model and data saved once by the parent,
so that both libraries see bit-identical weights and inputs. The child process times
`fit(DataLoader)` and `influences(x_test, y_test, x, y)` for a (64 test x 1000 train) matrix
over several repetitions, measures its peak resident memory increase, and saves the last
influence matrix to a `.npy` file; the parent compares it with an exact float64 solve.

This module is imported by both interpreters: at module level it only needs the standard
library, numpy and torch. It is also the child's entry point:
`python benchmarks/common.py worker <case.json>`.

Adding a solver benchmark: build `Case` objects whose `class_name` and `kwargs` name the
influence model of each library (or, for arguments that are not JSON, a `builder`
`"module:function"` importable from `benchmarks/`), then call `run_case` and
`relative_error` as `bench_direct.py` does.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
#: Interpreters, relative to the repository root unless absolute; overridden by the
#: environment variables INFLUX_PYTHON and INFLUX_REF_PYTHON.
DEFAULT_INFLUX_PYTHON = ".venv/bin/python"
DEFAULT_REF_PYTHON = ".venv-ref/bin/python"
N_TEST = 64
N_TRAIN_INFLUENCE = 1000
SEED = 0

LIBRARY_MODULES = {"influx": "influx.torch", "pydvl": "pydvl.influence.torch"}


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


def _loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "bce_logits":
        return torch.nn.functional.binary_cross_entropy_with_logits
    if name == "cross_entropy":
        return torch.nn.functional.cross_entropy
    raise ValueError(f"Unknown loss {name!r}.")


def _mlp(sizes: List[int]) -> torch.nn.Module:
    layers: List[torch.nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model architecture, a data set, a loss and the L2 strength used both in training and
    as the influence regularization $\\lambda$ (so that $H + \\lambda I$ is the Hessian of the
    training objective)."""

    name: str
    dataset: str  # "breast_cancer" or "digits"
    layer_sizes: List[int]  # [d_in, ..., d_out]; two entries = a linear model
    loss_name: str
    regularization: float
    batch_size: int = 256

    def build_model(self) -> torch.nn.Module:
        return _mlp(self.layer_sizes)

    @property
    def loss(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return _loss(self.loss_name)

    @property
    def n_parameters(self) -> int:
        s = self.layer_sizes
        return sum(a * b + b for a, b in zip(s[:-1], s[1:]))


WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("logreg_breast_cancer", "breast_cancer", [30, 1], "bce_logits", 1e-2),
        Workload("mlp_small_digits", "digits", [64, 32, 10], "cross_entropy", 1e-2),
        Workload("mlp_100k_digits", "digits", [64, 300, 256, 10], "cross_entropy", 1e-2),
    ]
}


def _load_data(workload: Workload) -> Dict[str, torch.Tensor]:
    """Deterministic split: 64 held-out test points, the rest for training, standardised with
    the training statistics. The influence matrix is taken against 1000 training points
    (the training set cycled when it has fewer)."""
    from sklearn import datasets

    if workload.dataset == "breast_cancer":
        x, y = datasets.load_breast_cancer(return_X_y=True)
    elif workload.dataset == "digits":
        x, y = datasets.load_digits(return_X_y=True)
    else:
        raise ValueError(f"Unknown data set {workload.dataset!r}.")
    perm = np.random.default_rng(SEED).permutation(len(x))
    test, train = perm[:N_TEST], perm[N_TEST:]
    mean = x[train].mean(0)
    std = x[train].std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    x_t = torch.tensor(x, dtype=torch.float64)
    if workload.loss_name == "bce_logits":
        y_t = torch.tensor(y, dtype=torch.float64).unsqueeze(1)
    else:
        y_t = torch.tensor(y, dtype=torch.long)
    infl = np.resize(np.arange(len(train)), N_TRAIN_INFLUENCE)
    return {
        "x_train": x_t[train],
        "y_train": y_t[train],
        "x_test": x_t[test],
        "y_test": y_t[test],
        "x_infl": x_t[train][infl],
        "y_infl": y_t[train][infl],
    }


def _train(workload: Workload, data: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """Full-batch L-BFGS in float64 on mean loss + (lambda / 2) |theta|^2 (at most 10,000
    iterations; 1,000 for models above 20,000 parameters, which are not solved exactly)."""
    torch.manual_seed(SEED)
    model = workload.build_model().double()
    loss = workload.loss
    lam = workload.regularization
    params = list(model.parameters())
    max_iter = 2000 if workload.n_parameters <= 20_000 else 200
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss(model(data["x_train"]), data["y_train"])
        value = value + 0.5 * lam * sum((p**2).sum() for p in params)
        value.backward()
        return value

    for _ in range(5):
        opt.step(closure)
    return model


def cache_dir() -> Path:
    """Where trained models, data and exact influences are kept (override: INFLUX_BENCH_CACHE)."""
    default = Path(tempfile.gettempdir()) / "influx-bench"
    path = Path(os.environ.get("INFLUX_BENCH_CACHE", str(default)))
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare(workload: Workload) -> Path:
    """Train the workload's model once and save its float64 state dict and data."""
    path = cache_dir() / workload.name
    state_file = path / "state.pt"
    if state_file.exists() and (path / "data.pt").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    data = _load_data(workload)
    model = _train(workload, data)
    torch.save(data, path / "data.pt")
    torch.save(model.state_dict(), state_file)
    return path


def load_workload(
    workload: Workload, dtype: torch.dtype
) -> "tuple[torch.nn.Module, Dict[str, torch.Tensor]]":
    """The trained model and data, cast to `dtype` (targets of class labels stay integer)."""
    path = cache_dir() / workload.name
    model = workload.build_model()
    model.load_state_dict(torch.load(path / "state.pt", weights_only=True))
    model = model.to(dtype).eval()
    data = torch.load(path / "data.pt", weights_only=True)
    data = {k: v.to(dtype) if v.is_floating_point() else v for k, v in data.items()}
    return model, data


# --------------------------------------------------------------------------------------------
# Exact float64 influences (independent of both libraries)
# --------------------------------------------------------------------------------------------


def _logreg_exact(model: torch.nn.Module, data: Dict[str, torch.Tensor], lam: float) -> np.ndarray:
    """Closed form: $g_i = (p_i - y_i) \\tilde x_i$, $H = \\frac1n \\tilde X^\\top
    \\mathrm{diag}(p(1-p)) \\tilde X$ with $\\tilde x = (x, 1)$."""
    w = model[0].weight.detach().numpy().ravel()
    b = float(model[0].bias.detach().numpy()[0])

    def aug(x: torch.Tensor) -> np.ndarray:
        x_np = x.numpy()
        return np.hstack([x_np, np.ones((len(x_np), 1))])

    def grads(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        xa = aug(x)
        p = 1.0 / (1.0 + np.exp(-(x.numpy() @ w + b)))
        return (p - y.numpy().ravel())[:, None] * xa

    xa = aug(data["x_train"])
    p = 1.0 / (1.0 + np.exp(-(data["x_train"].numpy() @ w + b)))
    hess = (xa * (p * (1 - p))[:, None]).T @ xa / len(xa)
    hess += lam * np.eye(hess.shape[0])
    g_test = grads(data["x_test"], data["y_test"])
    g_train = grads(data["x_infl"], data["y_infl"])
    return np.linalg.solve(hess, g_test.T).T @ g_train.T


def _generic_exact(
    model: torch.nn.Module, loss: Callable, data: Dict[str, torch.Tensor], lam: float
) -> np.ndarray:
    """Reverse-over-reverse Hessian of the mean loss over the whole training set, per-sample
    gradients with vmap, a float64 `torch.linalg.solve`."""
    from torch.func import functional_call, grad, jacrev, vmap

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def as_dict(theta: torch.Tensor) -> Dict[str, torch.Tensor]:
        parts = torch.split(theta, sizes)
        return {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}

    def mean_loss(theta: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(model, as_dict(theta), (data["x_train"],)), data["y_train"])

    def sample_loss(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, as_dict(theta), (x.unsqueeze(0),))
        return loss(out, y.unsqueeze(0))

    hess = jacrev(jacrev(mean_loss), chunk_size=64)(flat)
    hess = hess + lam * torch.eye(len(flat), dtype=flat.dtype)
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    g_test = per_sample(flat, data["x_test"], data["y_test"])
    g_train = per_sample(flat, data["x_infl"], data["y_infl"])
    return (torch.linalg.solve(hess, g_test.T).T @ g_train.T).numpy()


def exact_influences(workload: Workload) -> np.ndarray:
    """The (64, 1000) up-weighting influence matrix $g_{test}^\\top (H + \\lambda I)^{-1}
    g_{train}$ in float64, cached."""
    if workload.n_parameters > 20_000:
        raise ValueError(
            f"Workload {workload.name!r} has {workload.n_parameters} parameters: a dense "
            "float64 Hessian does not fit in memory, there is no exact reference for it."
        )
    path = prepare(workload) / "exact.npy"
    if path.exists():
        return np.load(path)
    model, data = load_workload(workload, torch.float64)
    if workload.loss_name == "bce_logits" and len(workload.layer_sizes) == 2:
        result = _logreg_exact(model, data, workload.regularization)
    else:
        result = _generic_exact(model, workload.loss, data, workload.regularization)
    np.save(path, result)
    return result


def relative_error(result: np.ndarray, exact: np.ndarray) -> float:
    """Relative Frobenius error $\\|R - E\\| / \\|E\\|$, computed in float64."""
    result = np.asarray(result, dtype=np.float64)
    return float(np.linalg.norm(result - exact) / np.linalg.norm(exact))


# --------------------------------------------------------------------------------------------
# Cases and the isolated runner
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One benchmark case, run in its own process.

    Attributes:
        library: "influx" or "pydvl".
        class_name: the influence model class in the library's torch module.
        kwargs: keyword arguments of the class besides model, loss and regularization.
        workload: a key of `WORKLOADS`.
        threads: torch intra-op threads; 0 means torch's default.
        dtype: "float32" or "float64".
        repeats: timed repetitions (one untimed warm-up run precedes them).
        builder: optional "module:function" in `benchmarks/` called as
            `function(library, model, loss, regularization, kwargs)` instead of the class.
    """

    library: str
    class_name: str
    workload: str
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    threads: int = 0
    dtype: str = "float32"
    repeats: int = 5
    builder: Optional[str] = None


@dataclasses.dataclass
class CaseResult:
    case: Case
    fit_seconds: List[float]
    influence_seconds: List[float]
    peak_mb: float
    threads_used: int
    matrix_file: str

    @property
    def fit_median(self) -> float:
        return statistics.median(self.fit_seconds)

    @property
    def influence_median(self) -> float:
        return statistics.median(self.influence_seconds)

    def matrix(self) -> np.ndarray:
        return np.load(self.matrix_file)


def _interpreter_works(python: str, module: str) -> bool:
    if not Path(python).exists():
        return False
    probe = subprocess.run(
        [python, "-W", "ignore", "-c", f"import {module}"],
        capture_output=True,
        env=_child_env(None),
        timeout=300,
    )
    return probe.returncode == 0


def _resolve_interpreter(path: str) -> str:
    """`path` as given if absolute or found on PATH, else relative to the repository root."""
    candidate = Path(path)
    if candidate.is_absolute() or os.sep not in path:
        return path
    return str(REPO_ROOT / candidate)


def reference_interpreter() -> str:
    """The configured reference interpreter (env INFLUX_REF_PYTHON, default
    `.venv-ref/bin/python` under the repository root), whether or not it works."""
    return _resolve_interpreter(os.environ.get("INFLUX_REF_PYTHON", DEFAULT_REF_PYTHON))


@functools.cache
def reference_python() -> Optional[str]:
    """The reference library's interpreter (`reference_interpreter`) if it can import pyDVL's
    torch influence module, else None."""
    python = reference_interpreter()
    return python if _interpreter_works(python, LIBRARY_MODULES["pydvl"]) else None


def influx_python() -> str:
    """The interpreter for influx (env INFLUX_PYTHON, default `.venv/bin/python` under the
    repository root, else the running interpreter)."""
    configured = os.environ.get("INFLUX_PYTHON")
    if configured:
        return _resolve_interpreter(configured)
    default = _resolve_interpreter(DEFAULT_INFLUX_PYTHON)
    return default if Path(default).exists() else sys.executable


def _child_env(pythonpath: Optional[str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def run_case(case: Case, timeout: float = 3600) -> CaseResult:
    """Run `case` in a fresh process and collect its timings, memory and influence matrix."""
    workload = WORKLOADS[case.workload]
    prepare(workload)
    if case.library == "influx":
        python, pythonpath = influx_python(), str(REPO_ROOT / "src")
    elif case.library == "pydvl":
        ref = reference_python()
        if ref is None:
            raise RuntimeError("The reference library is not available.")
        python, pythonpath = ref, None
    else:
        raise ValueError(f"Unknown library {case.library!r}.")
    out_dir = Path(tempfile.mkdtemp(prefix="case-", dir=cache_dir()))
    spec = dataclasses.asdict(case)
    spec["matrix_file"] = str(out_dir / "influences.npy")
    spec_file = out_dir / "case.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "worker", str(spec_file)],
        capture_output=True,
        text=True,
        env=_child_env(pythonpath),
        timeout=timeout,
        cwd=str(REPO_ROOT),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"Case {case} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return CaseResult(
        case=case,
        fit_seconds=report["fit_seconds"],
        influence_seconds=report["influence_seconds"],
        peak_mb=report["peak_mb"],
        threads_used=report["threads"],
        matrix_file=spec["matrix_file"],
    )


def _max_rss_mb() -> float:
    # Linux reports ru_maxrss in kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build(spec: Dict[str, Any], model: torch.nn.Module, workload: Workload) -> Any:
    if spec.get("builder"):
        module_name, func_name = spec["builder"].split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        return func(spec["library"], model, workload.loss, workload.regularization, spec["kwargs"])
    cls = getattr(importlib.import_module(LIBRARY_MODULES[spec["library"]]), spec["class_name"])
    return cls(model, workload.loss, regularization=workload.regularization, **spec["kwargs"])


def _worker(spec_file: str) -> None:
    warnings.filterwarnings("ignore")
    spec = json.loads(Path(spec_file).read_text())
    importlib.import_module(LIBRARY_MODULES[spec["library"]])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    workload = WORKLOADS[spec["workload"]]
    model, data = load_workload(workload, getattr(torch, spec["dtype"]))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x_train"], data["y_train"]),
        batch_size=workload.batch_size,
    )
    gc.collect()
    baseline = _max_rss_mb()
    fit_times: List[float] = []
    influence_times: List[float] = []
    values: Optional[torch.Tensor] = None
    for rep in range(spec["repeats"] + 1):
        values = None
        gc.collect()
        influence_model = _build(spec, model, workload)
        start = time.perf_counter()
        influence_model.fit(loader)
        fitted = time.perf_counter()
        values = influence_model.influences(
            data["x_test"], data["y_test"], data["x_infl"], data["y_infl"]
        )
        done = time.perf_counter()
        if rep > 0:  # the first run warms up torch (kernels, vmap, allocator)
            fit_times.append(fitted - start)
            influence_times.append(done - fitted)
        del influence_model
    assert values is not None
    peak = _max_rss_mb() - baseline
    np.save(spec["matrix_file"], values.detach().cpu().numpy())
    report = {
        "fit_seconds": fit_times,
        "influence_seconds": influence_times,
        "peak_mb": peak,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report))


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def markdown_table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def replace_readme_section(key: str, text: str) -> None:
    """Replace the text between `<!-- key:start -->` and `<!-- key:end -->` in README.md."""
    readme = BENCH_DIR / "README.md"
    content = readme.read_text()
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    if start not in content or end not in content:
        raise ValueError(f"README.md has no section markers {start} ... {end}.")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def matmul_gflops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matrix-product throughput in GFLOP/s at `threads` torch threads
    (the median of `repeats` products of two `size x size` matrices, after one warm-up); the
    thread count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size)
        b = torch.randn(size, size)
        torch.mm(a, b)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2.0 * size**3 / statistics.median(times) / 1e9


def machine_note() -> str:
    load = os.getloadavg()
    return (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: common.py worker <case.json>")
