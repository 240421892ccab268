"""Scale benchmark: a 1,000 x 10,000 influence matrix of a CNN with over a million parameters.

Data: scikit-learn's 8x8 digits upsampled to 1x32x32, augmented with random shifts (up to 3
pixels) and Gaussian noise; 10,000 training images from 1,500 digits and 1,000 test images
from the other 297 (built offline, deterministic). Model: three 3x3 convolutions (32, 64, 128
channels, ReLU, max-pooling) and two linear layers (2048-512-10), 1,146,890 parameters,
trained with Adam for a few epochs.

For each method a fresh subprocess fits the influence model on the training set and writes
the influence matrix of the test set on the training set to zarr with the sequential
calculator (the fit uses the whole training set; `--matrix-test` / `--matrix-train` restrict
the matrix to the first points, for a reduced run); it reports the fit time, the matrix time
and its peak resident memory increase
(`ru_maxrss`, relative to the process after loading model and data). The parent then
compares the two matrices (Pearson, Spearman overall and per test point).

Every run also prints the machine's float32 matrix-product throughput (2048 x 2048, at one
thread and at the run's thread count) and the time of each phase, wall clock and CPU: the
fit's factors, eigendecomposition and eigenvalue correction (EK-FAC), and the scoring's test
factors (once per test chunk) and training chunks (once per test chunk and training chunk).

Usage (from the repository root). The defaults are the settings of the table in
`benchmarks/README.md` (training batches of 250, EK-FAC test chunks of 250, the projection's
one test chunk of 1,000, two torch threads, the sequential calculator):

    PYTHONPATH=src python benchmarks/bench_scale.py --methods ekfac
    PYTHONPATH=src python benchmarks/bench_scale.py --methods projected

A reduced run fits on the whole training set and scores only the first test points, e.g.
`--matrix-test 200` (one EK-FAC test chunk against all training points).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
from common import matmul_gflops

import torch

HERE = Path(__file__).resolve()
README = HERE.parent / "README.md"
REGULARIZATION = 1e-2
SEED = 0


def build_model() -> torch.nn.Module:
    def block(c_in: int, c_out: int) -> List[torch.nn.Module]:
        return [
            torch.nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        ]

    return torch.nn.Sequential(
        *block(1, 32),
        *block(32, 64),
        *block(64, 128),
        torch.nn.Flatten(),
        torch.nn.Linear(128 * 4 * 4, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )


def make_data(n_train: int, n_test: int) -> Dict[str, torch.Tensor]:
    """Upsampled digits with shifts and noise (deterministic)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(x))
    train_idx, test_idx = order[:1500], order[1500:]
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    big = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear")

    def augment(indices: np.ndarray, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        pick = rng.choice(indices, size=n, replace=True)
        shifts = rng.integers(-3, 4, size=(n, 2))
        out = torch.empty(n, 1, 32, 32)
        for i, (index, (dy, dx)) in enumerate(zip(pick, shifts)):
            out[i] = torch.roll(big[index], shifts=(int(dy), int(dx)), dims=(1, 2))
        noise = torch.from_numpy(rng.normal(scale=0.1, size=out.shape).astype(np.float32))
        return (out + noise - 0.25) / 0.35, torch.tensor(y[pick], dtype=torch.long)

    x_train, y_train = augment(train_idx, n_train)
    x_test, y_test = augment(test_idx, n_test)
    return {"x": x_train, "y": y_train, "x_test": x_test, "y_test": y_test}


def prepare(workdir: Path, n_train: int, n_test: int, epochs: int) -> Dict[str, Any]:
    """Data and a trained model, saved once in `workdir`."""
    state = workdir / "model.pt"
    if state.exists():
        return json.loads((workdir / "training.json").read_text())  # type: ignore[no-any-return]
    start = time.perf_counter()
    data = make_data(n_train, n_test)
    torch.manual_seed(SEED)
    net = build_model()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"], data["y"]), batch_size=128, shuffle=True
    )
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(xb), yb).backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(data["x_test"]).argmax(1) == data["y_test"]).float().mean())
    torch.save(net.state_dict(), state)
    torch.save(data, workdir / "data.pt")
    info = {
        "n_parameters": sum(p.numel() for p in net.parameters()),
        "test_accuracy": accuracy,
        "epochs": epochs,
        "train_seconds": time.perf_counter() - start,
    }
    (workdir / "training.json").write_text(json.dumps(info))
    return info


def _dask_matrix(
    model: Any,
    data: Dict[str, torch.Tensor],
    rows: int,
    columns: int,
    options: Dict[str, Any],
    path: Path,
) -> None:
    """The influence matrix written to zarr by the Dask calculator, on a `LocalCluster` with
    one worker of one thread in this process (torch's threads as set), so that the process's
    peak memory covers the scheduler and the worker."""
    import dask.array as da
    from distributed import Client, LocalCluster

    from influx import DaskInfluenceCalculator
    from influx.array import dask_array_to_zarr
    from influx.torch import TorchNumpyConverter

    def array(t: torch.Tensor, chunk: int) -> Any:
        values = t.numpy()
        return da.from_array(values, chunks=(chunk,) + values.shape[1:])

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        calculator = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
        values = calculator.influences(
            array(data["x_test"][:rows], options["test_batch"]),
            array(data["y_test"][:rows], options["test_batch"]),
            array(data["x"][:columns], options["train_batch"]),
            array(data["y"][:columns], options["train_batch"]),
        )
        dask_array_to_zarr(values, str(path), overwrite=True)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class PhaseTimer:
    """Wall-clock and CPU seconds (of the process, all threads) spent in wrapped functions,
    summed by phase name; on a shared machine the CPU seconds vary less than the wall clock."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self.cpu_seconds: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}

    def wrap(self, phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
                used = time.process_time() - cpu
                self.cpu_seconds[phase] = self.cpu_seconds.get(phase, 0.0) + used
                self.calls[phase] = self.calls.get(phase, 0) + 1

        return timed


def _time_fit_phases(timer: PhaseTimer) -> None:
    """Time EK-FAC's fit by phase: the factors' pass, their eigendecomposition, the eigenvalue
    refit (the functions `fit_kronecker_curvature` calls)."""
    from influx.torch.kfac import factors

    for phase, name in (
        ("fit: factors", "collect_kronecker_factors"),
        ("fit: eigendecomposition", "eigendecompose_factors"),
        ("fit: eigenvalue correction", "refit_eigenvalues"),
    ):
        setattr(factors, name, timer.wrap(phase, getattr(factors, name)))


def worker(workdir: Path, method: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """Fit one method and write its influence matrix to zarr; timings by phase and peak memory."""
    from torch.utils.data import DataLoader, TensorDataset

    from influx.calculator import SequentialInfluenceCalculator
    from influx.torch import EkfacInfluence, ProjectedInfluence, TorchNumpyConverter

    torch.set_num_threads(int(options["threads"]))
    gflops = {"1": matmul_gflops(1), str(options["threads"]): matmul_gflops(options["threads"])}
    timer = PhaseTimer()
    _time_fit_phases(timer)
    net = build_model()
    net.load_state_dict(torch.load(workdir / "model.pt", weights_only=True))
    net.eval()
    data = torch.load(workdir / "data.pt", weights_only=True)
    train = DataLoader(TensorDataset(data["x"], data["y"]), batch_size=options["train_batch"])
    rows, columns = options["matrix_test"], options["matrix_train"]
    test = DataLoader(
        TensorDataset(data["x_test"][:rows], data["y_test"][:rows]),
        batch_size=options["test_batch"],
    )
    columns_loader = DataLoader(
        TensorDataset(data["x"][:columns], data["y"][:columns]),
        batch_size=options["train_batch"],
    )
    loss = torch.nn.functional.cross_entropy
    baseline = _rss_mb()
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    if method == "projected":
        model: Any = ProjectedInfluence(
            net, loss, options["k"], regularization=REGULARIZATION, seed=SEED
        )
    else:
        model = EkfacInfluence(
            net, update_diagonal=True, hessian_regularization=REGULARIZATION, loss=loss
        )
    model.fit(train)
    fitted = time.perf_counter()
    # the calculators call these per test chunk and per (test chunk, training chunk)
    model.influence_factors = timer.wrap("scoring: test factors", model.influence_factors)
    model.influences_from_factors = timer.wrap(
        "scoring: training chunks", model.influences_from_factors
    )
    dask = options.get("calculator", "sequential") == "dask"
    path = workdir / f"{method}{'-dask' if dask else ''}.zarr"
    if dask:
        _dask_matrix(model, data, rows, columns, options, path)
    else:
        calculator = SequentialInfluenceCalculator(model)
        lazy = calculator.influences(test, columns_loader)
        lazy.to_zarr(path, TorchNumpyConverter(), overwrite=True)
    done = time.perf_counter()
    result = {
        "calculator": "dask" if dask else "sequential",
        "method": method,
        "fit_seconds": fitted - start,
        "matrix_seconds": done - fitted,
        "total_seconds": done - start,
        "peak_mb": _rss_mb() - baseline,
        "cpu_seconds": _cpu_seconds() - cpu_start,
        "path": str(path),
        "phases": timer.seconds,
        "phase_cpu_seconds": timer.cpu_seconds,
        "phase_calls": timer.calls,
        "matmul_gflops": gflops,
        "load_average": os.getloadavg(),
    }
    if method == "projected":
        result["projected_sizes"] = model.projected_sizes
    sequential = workdir / f"{method}.zarr"
    if dask and sequential.exists():
        import zarr

        ours = np.asarray(zarr.open_array(str(path), mode="r")[...], dtype=np.float64)
        other = np.asarray(zarr.open_array(str(sequential), mode="r")[...], dtype=np.float64)
        if ours.shape == other.shape:
            scale = float(np.abs(other).max())
            result["max_difference_to_sequential"] = float(np.abs(ours - other).max()) / scale
    return result


def breakdown(result: Dict[str, Any]) -> str:
    """The per-phase figures of one run, with the machine's matrix-product throughput."""
    phases, calls = result["phases"], result["phase_calls"]
    lines = [
        f"{result['method']} ({result['calculator']}): fit {result['fit_seconds']:.1f} s, matrix "
        f"{result['matrix_seconds']:.1f} s, total {result['total_seconds']:.1f} s, CPU "
        f"{result['cpu_seconds']:.0f} s, peak {result['peak_mb']:.0f} MB; float32 2048^2 matmul "
        + ", ".join(f"{g:.0f} GFLOP/s at {t} thread(s)" for t, g in result["matmul_gflops"].items())
        + ", load average "
        + " / ".join(f"{v:.1f}" for v in result["load_average"])
    ]
    cpu = result["phase_cpu_seconds"]
    for phase, seconds in phases.items():
        lines.append(
            f"  {phase}: {seconds:.1f} s ({cpu[phase]:.1f} CPU s) in {calls[phase]} call(s)"
        )
    scoring = [k for k in phases if k.startswith("scoring")]
    if scoring:
        wall, used = sum(phases[k] for k in scoring), sum(cpu[k] for k in scoring)
        lines.append(f"  scoring: total {wall:.1f} s ({used:.1f} CPU s)")
    return "\n".join(lines)


def compare(paths: Dict[str, str]) -> Dict[str, float]:
    import zarr
    from scipy.stats import pearsonr, spearmanr

    a = np.asarray(zarr.open_array(paths["ekfac"], mode="r")[...], dtype=np.float64)
    b = np.asarray(zarr.open_array(paths["projected"], mode="r")[...], dtype=np.float64)
    per_row = [spearmanr(a[i], b[i])[0] for i in range(a.shape[0])]
    return {
        "pearson": float(pearsonr(a.ravel(), b.ravel())[0]),
        "spearman": float(spearmanr(a.ravel(), b.ravel())[0]),
        "spearman_per_test_point": float(np.mean(per_row)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-test", type=int, default=1_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--methods", default="projected,ekfac")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=250)
    parser.add_argument("--test-batch", type=int, default=250)
    parser.add_argument("--projected-test-batch", type=int, default=1000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--calculator",
        default="sequential",
        choices=["sequential", "dask"],
        help="the sequential calculator or the Dask one (a LocalCluster in the process)",
    )
    parser.add_argument(
        "--matrix-test", type=int, default=None, help="test points of the matrix (default all)"
    )
    parser.add_argument(
        "--matrix-train", type=int, default=None, help="train points of the matrix (default all)"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    default = Path(tempfile.gettempdir()) / f"influx-scale-{args.n_train}-{args.n_test}"
    workdir = Path(args.workdir or default)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        options = json.loads(args.worker)
        print(json.dumps(worker(workdir, options["method"], options)))
        return
    training = prepare(workdir, args.n_train, args.n_test, args.epochs)
    print(f"model: {training}", flush=True)
    print(f"command: {' '.join(sys.argv[1:]) or '(the defaults)'}", flush=True)
    results: Dict[str, Dict[str, Any]] = {}
    for method in args.methods.split(","):
        options = {
            "method": method,
            "k": args.k,
            "threads": args.threads,
            "train_batch": args.train_batch,
            "test_batch": args.projected_test_batch if method == "projected" else args.test_batch,
            "matrix_test": args.matrix_test or args.n_test,
            "matrix_train": args.matrix_train or args.n_train,
            "calculator": args.calculator,
        }
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        command = [sys.executable, str(HERE), "--workdir", str(workdir), "--worker"]
        output = subprocess.run(
            command + [json.dumps(options)], env=env, capture_output=True, text=True, check=False
        )
        if output.returncode != 0:
            raise RuntimeError(f"{method} failed:\n{output.stderr[-3000:]}")
        results[method] = json.loads(output.stdout.strip().splitlines()[-1])
        print(json.dumps(results[method]), flush=True)
        print(breakdown(results[method]), flush=True)
    if {"ekfac", "projected"} <= set(results):
        agreement = compare({m: r["path"] for m, r in results.items()})
        print(f"agreement: {agreement}", flush=True)


if __name__ == "__main__":
    main()
