"""Benchmark: threads or processes for the Dask calculator, against the sequential one.

The (test x train) influence matrix of the digits MLP (`DirectInfluence`, float32) is written
to zarr, in the same run, by

* one Dask worker process with 2 threads (the model is shared by the threads),
* two Dask worker processes with 1 thread each (one copy of the model per process),
* the sequential calculator in one process (torch's default intra-op threads).

Every measurement runs in a fresh subprocess. The Dask workers are warmed up before timing
(a small corner of the matrix is computed first, so that each worker has imported torch and
deserialised the model); the time is that of `dask_array_to_zarr` (resp. `to_zarr`) for the
whole matrix. The stored matrices are compared with each other.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/bench_dask_threads.py [--repeats 2] [--n-train 20000]

The results table is printed and written to the "Dask: threads or processes" section of
`benchmarks/README.md`.
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
from typing import Any, Dict, List

from bench_calculator import HIDDEN, REGULARIZATION, TEST_CHUNK, TRAIN_CHUNK, prepare

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "1 worker x 2 threads": ("dask", 1, 2),
    "2 workers x 1 thread": ("dask", 2, 1),
    "sequential": ("sequential", 0, 0),
}


def worker(config: str, n_test: int, n_train: int, workdir: str) -> None:
    """Run one measurement and print a JSON line."""
    import numpy as np
    import zarr  # noqa: F401  (imported before timing)
    from torch.utils.data import DataLoader, TensorDataset

    import torch
    from influx.torch import DirectInfluence, TorchNumpyConverter

    kind, n_workers, n_threads = CONFIGS[config]
    work = Path(workdir)
    data = np.load(work / "data.npz")
    net = torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 10)
    )
    net.load_state_dict(torch.load(work / "net.pt"))
    loss = torch.nn.functional.cross_entropy
    fit_loader = DataLoader(
        TensorDataset(torch.from_numpy(data["x_fit"]), torch.from_numpy(data["y_fit"])),
        batch_size=512,
    )
    model = DirectInfluence(net, loss, regularization=REGULARIZATION).fit(fit_loader)
    x_train, y_train = data["x_train"][:n_train], data["y_train"][:n_train]
    x_test, y_test = data["x_test"][:n_test], data["y_test"][:n_test]
    path = work / f"{config.replace(' ', '_')}-{n_train}.zarr"
    if kind == "sequential":
        from influx import SequentialInfluenceCalculator

        def batches(x: Any, y: Any, size: int) -> List[Any]:
            return [
                (torch.from_numpy(x[i : i + size]), torch.from_numpy(y[i : i + size]))
                for i in range(0, len(x), size)
            ]

        lazy = SequentialInfluenceCalculator(model).influences(
            batches(x_test, y_test, TEST_CHUNK), batches(x_train, y_train, TRAIN_CHUNK)
        )
        start = time.perf_counter()
        lazy.to_zarr(str(path), TorchNumpyConverter(), overwrite=True)
        seconds = time.perf_counter() - start
    else:
        import dask.array as da
        from distributed import Client, LocalCluster

        from influx import DaskInfluenceCalculator
        from influx.array import dask_array_to_zarr

        with (
            LocalCluster(
                n_workers=n_workers,
                threads_per_worker=n_threads,
                processes=True,
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
            DaskInfluenceCalculator(model, TorchNumpyConverter(), client) as calc,
        ):
            dx = da.from_array(x_train, chunks=(TRAIN_CHUNK, -1))
            dy = da.from_array(y_train, chunks=TRAIN_CHUNK)
            dx_test = da.from_array(x_test, chunks=(TEST_CHUNK, -1))
            dy_test = da.from_array(y_test, chunks=TEST_CHUNK)
            corner = 2 * n_workers * max(n_threads, 1) * TRAIN_CHUNK
            calc.influences(
                dx_test[:TEST_CHUNK], dy_test[:TEST_CHUNK], dx[:corner], dy[:corner]
            ).compute()
            values = calc.influences(dx_test, dy_test, dx, dy)
            start = time.perf_counter()
            dask_array_to_zarr(values, str(path), overwrite=True)
            seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "path": str(path)}))


def _run(config: str, n_test: int, n_train: int, workdir: Path) -> Dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONWARNINGS="ignore")
    command = [
        sys.executable,
        __file__,
        "--worker",
        config,
        str(n_test),
        str(n_train),
        str(workdir),
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _max_rel_diff(paths: List[str]) -> float:
    import numpy as np
    import zarr

    first = zarr.open_array(paths[0], mode="r")[...]
    return max(
        float(np.linalg.norm(zarr.open_array(p, mode="r")[...] - first) / np.linalg.norm(first))
        for p in paths[1:]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    seconds: Dict[str, List[float]] = {config: [] for config in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.n_test, args.n_train)
        paths: Dict[str, str] = {}
        for _ in range(args.repeats):
            for config in CONFIGS:  # interleaved, so that load changes hit every config
                result = _run(config, args.n_test, args.n_train, workdir)
                seconds[config].append(result["seconds"])
                paths[config] = result["path"]
                print(config, f"{result['seconds']:.2f} s", flush=True)
        diff = _max_rel_diff(list(paths.values()))
    table = _table(seconds, args.n_test, args.n_train, diff)
    table += (
        f"\n\nMachine: {os.cpu_count()} cores; 1-minute load average {load_before:.1f} at the "
        f"start and {os.getloadavg()[0]:.1f} at the end of the run."
    )
    print(table)
    if not args.no_readme:
        _write_readme(table)


def _table(seconds: Dict[str, List[float]], n_test: int, n_train: int, diff: float) -> str:
    sequential = statistics.median(seconds["sequential"])
    lines = [
        "| matrix | calculator | median (s) | runs (s) | speed vs sequential |",
        "| --- | --- | --- | --- | --- |",
    ]
    for config, values in seconds.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.2f}" for v in values)
        lines.append(
            f"| {n_test} x {n_train} | {config} | {median:.2f} | {runs} | "
            f"{sequential / median:.2f}x |"
        )
    lines.append("")
    lines.append(f"Largest relative difference between the stored matrices: {diff:.1e}.")
    return "\n".join(lines)


def _write_readme(table: str) -> None:
    readme = ROOT / "benchmarks" / "README.md"
    text = readme.read_text()
    header = "## Dask: threads or processes"
    body = (
        f"{header}\n\n"
        "`benchmarks/bench_dask_threads.py`: the influence matrix of the digits MLP (64-"
        f"{HIDDEN}-10, 1210 parameters, float32, `DirectInfluence`, regularization "
        f"{REGULARIZATION}) written to zarr with test chunks of {TEST_CHUNK} and train chunks "
        f"of {TRAIN_CHUNK}, by one Dask worker with 2 threads, two workers with 1 thread, and "
        "the sequential calculator (torch's default threads), each in a fresh process, "
        "interleaved; Dask workers warmed up before timing.\n\n"
        f"{table}\n"
    )
    if header in text:
        start = text.index(header)
        end = text.find("\n## ", start + len(header))
        text = text[:start] + body + ("" if end < 0 else text[end:])
    else:
        text = text.rstrip("\n") + "\n\n" + body
    readme.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main()
