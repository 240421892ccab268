"""Benchmark: write a (test x train) influence matrix of the digits MLP to zarr.

influx against the reference library (pyDVL 0.10.0 in its own virtual environment), in the
same run, with the sequential calculator and with a 2-worker Dask LocalCluster. Every
measurement runs in a fresh subprocess; peak memory is the growth of the resident set size
during the write (sampled every 3 ms) in the process that computes: the calculator's process
for the sequential runs, the larger of the two worker processes for Dask.

Usage (from the repository root):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_calculator.py [--repeats 3]

The results table is printed and written to the "Calculators" section of
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
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
INFLUX_PYTHON = os.environ.get("INFLUX_PYTHON", sys.executable)
REFERENCE_PYTHON = str(
    ROOT
    / os.environ.get(
        "INFLUX_REF_PYTHON", os.environ.get("REFERENCE_PYTHON", ".venv-ref/bin/python")
    )
)
HIDDEN = 16
REGULARIZATION = 0.01
TEST_CHUNK = 500
TRAIN_CHUNK = 1000


def prepare(workdir: Path, n_test: int, n_train: int, seed: int = 0) -> None:
    """Digits tiled with small noise, and an MLP trained on the original digits."""
    import numpy as np
    from sklearn.datasets import load_digits

    import torch

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)

    def tiled(n: int) -> Tuple[Any, Any]:
        idx = rng.integers(0, len(x), size=n)
        noise = rng.normal(scale=0.02, size=(n, x.shape[1])).astype(np.float32)
        return x[idx] + noise, y[idx].astype(np.int64)

    x_train, y_train = tiled(n_train)
    x_test, y_test = tiled(n_test)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 10)
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        optimizer.step()
    torch.save(net.state_dict(), workdir / "net.pt")
    np.savez(
        workdir / "data.npz",
        x_fit=x,
        y_fit=y.astype(np.int64),
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
    )


def _rss_mb() -> float:
    """The current resident set size of this process in MB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakSampler:
    """Samples the RSS every few milliseconds; `stop()` returns peak minus the start value."""

    def __init__(self) -> None:
        import threading

        self.base = _rss_mb()
        self.peak = self.base
        self._running = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while self._running:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.003)

    def stop(self) -> float:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())
        return self.peak - self.base


def _start_worker_sampler(dask_worker: Any) -> None:
    dask_worker._bench_sampler = PeakSampler()


def _stop_worker_sampler(dask_worker: Any) -> float:
    return float(dask_worker._bench_sampler.stop())


def worker(lib: str, scheduler: str, threads: str, n_test: int, n_train: int, workdir: str) -> None:
    """Run one measurement and print a JSON line."""
    import numpy as np
    import zarr  # noqa: F401  (imported before timing, for both libraries)
    from torch.utils.data import DataLoader, TensorDataset

    import torch

    if threads == "1":
        torch.set_num_threads(1)
    work = Path(workdir)
    data = np.load(work / "data.npz")
    net = torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 10)
    )
    net.load_state_dict(torch.load(work / "net.pt"))
    loss = torch.nn.functional.cross_entropy
    x_fit, y_fit = torch.from_numpy(data["x_fit"]), torch.from_numpy(data["y_fit"])
    x_train, y_train = data["x_train"][:n_train], data["y_train"][:n_train]
    x_test, y_test = data["x_test"][:n_test], data["y_test"][:n_test]
    fit_loader = DataLoader(TensorDataset(x_fit, y_fit), batch_size=512)
    if lib == "influx":
        from influx.torch import DirectInfluence, TorchNumpyConverter
    else:
        from pydvl.influence.torch import DirectInfluence
        from pydvl.influence.torch.util import TorchNumpyConverter
    model = DirectInfluence(net, loss, regularization=REGULARIZATION).fit(fit_loader)
    path = work / f"{lib}-{scheduler}-{threads}-{n_train}.zarr"
    result: Dict[str, Any] = {}
    if scheduler == "sequential":
        if lib == "influx":
            from influx import SequentialInfluenceCalculator
        else:
            from pydvl.influence.influence_calculator import SequentialInfluenceCalculator
        test_batches = _batches(x_test, y_test, TEST_CHUNK)
        train_batches = _batches(x_train, y_train, TRAIN_CHUNK)
        lazy = SequentialInfluenceCalculator(model).influences(test_batches, train_batches)
        sampler = PeakSampler()
        start = time.perf_counter()
        lazy.to_zarr(str(path), TorchNumpyConverter(), overwrite=True)
        result["seconds"] = time.perf_counter() - start
        result["peak_mb"] = sampler.stop()
    else:
        import dask.array as da
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):

            def warm_up(n_threads: str = threads, library: str = lib) -> None:
                import zarr as worker_zarr  # noqa: F401

                import torch as worker_torch

                if n_threads == "1":
                    worker_torch.set_num_threads(1)
                if library == "influx":
                    import influx.torch  # noqa: F401
                else:
                    import pydvl.influence.torch  # noqa: F401

            client.run(warm_up)
            dx = da.from_array(x_train, chunks=(TRAIN_CHUNK, -1))
            dy = da.from_array(y_train, chunks=TRAIN_CHUNK)
            dx_test = da.from_array(x_test, chunks=(TEST_CHUNK, -1))
            dy_test = da.from_array(y_test, chunks=TEST_CHUNK)
            if lib == "influx":
                from influx import DaskInfluenceCalculator
                from influx.array import dask_array_to_zarr

                calc = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
                _warm_workers(calc, dx_test, dy_test, dx, dy)
                client.run(_start_worker_sampler)
                start = time.perf_counter()
                values = calc.influences(dx_test, dy_test, dx, dy)
                dask_array_to_zarr(values, str(path), overwrite=True)
            else:
                from pydvl.influence.influence_calculator import DaskInfluenceCalculator

                calc = DaskInfluenceCalculator(model, TorchNumpyConverter(), client)
                _warm_workers(calc, dx_test, dy_test, dx, dy)
                client.run(_start_worker_sampler)
                start = time.perf_counter()
                values = calc.influences(dx_test, dy_test, dx, dy)
                values.to_zarr(str(path), overwrite=True)
            result["seconds"] = time.perf_counter() - start
            result["peak_mb"] = max(client.run(_stop_worker_sampler).values())
    result["path"] = str(path)
    print(json.dumps(result))


def _warm_workers(calc: Any, x_test: Any, y_test: Any, x: Any, y: Any) -> None:
    """With BENCH_WARM=1, compute a few blocks first so that both workers have run torch."""
    if os.environ.get("BENCH_WARM") != "1":
        return
    n_test, n_train = 2 * TEST_CHUNK, 4 * TRAIN_CHUNK
    calc.influences(x_test[:n_test], y_test[:n_test], x[:n_train], y[:n_train]).compute()


def _batches(x: Any, y: Any, size: int) -> List[Tuple[Any, Any]]:
    import torch

    return [
        (torch.from_numpy(x[i : i + size]), torch.from_numpy(y[i : i + size]))
        for i in range(0, len(x), size)
    ]


def _run(
    lib: str, scheduler: str, threads: str, n_test: int, n_train: int, workdir: Path
) -> Dict[str, Any]:
    python = INFLUX_PYTHON if lib == "influx" else REFERENCE_PYTHON
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONWARNINGS="ignore")
    if threads == "1":
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [
        python,
        __file__,
        "--worker",
        lib,
        scheduler,
        threads,
        str(n_test),
        str(n_train),
        str(workdir),
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _check(workdir: Path, influx_path: str, reference_path: str) -> float:
    """Relative difference of a block of the two matrices."""
    import numpy as np
    import zarr

    ours = zarr.open_array(influx_path, mode="r")[:500, :4000]
    theirs = zarr.open_array(reference_path, mode="r")[:500, :4000]
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--n-train", type=int, default=20000)
    parser.add_argument("--small-train", type=int, default=5000)
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--schedulers", default="sequential,dask")
    args = parser.parse_args()
    import torch

    default_threads = torch.get_num_threads()
    load_before = os.getloadavg()[0]
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.n_test, args.n_train)
        for n_train in (args.n_train, args.small_train):
            repeats = args.repeats if n_train == args.n_train else 1
            thread_settings = ("1", "default") if n_train == args.n_train else ("1",)
            for threads in thread_settings:
                for scheduler in args.schedulers.split(","):
                    measured: Dict[str, List[Dict[str, Any]]] = {"influx": [], "reference": []}
                    for _ in range(repeats):
                        for lib in ("influx", "reference"):
                            measured[lib].append(
                                _run(lib, scheduler, threads, args.n_test, n_train, workdir)
                            )
                    diff = _check(
                        workdir, measured["influx"][0]["path"], measured["reference"][0]["path"]
                    )
                    row = {
                        "n_train": n_train,
                        "threads": threads,
                        "scheduler": scheduler,
                        "repeats": repeats,
                        "diff": diff,
                    }
                    for lib in ("influx", "reference"):
                        row[f"{lib}_s"] = statistics.median(m["seconds"] for m in measured[lib])
                        row[f"{lib}_mb"] = statistics.median(m["peak_mb"] for m in measured[lib])
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    table = _table(rows, args.n_test, default_threads)
    table += (
        f"\n\nMachine: {os.cpu_count()} cores; 1-minute load average {load_before:.1f} at the "
        f"start and {os.getloadavg()[0]:.1f} at the end of the run (other jobs were running)."
    )
    print(table)
    if not args.no_readme:
        _write_readme(table)


def _table(rows: List[Dict[str, Any]], n_test: int, default_threads: int) -> str:
    by_key = {(r["n_train"], r["threads"], r["scheduler"]): r for r in rows}
    lines = [
        "| matrix | torch threads | calculator | influx (s) | reference (s) | speed-up | "
        "influx peak MB | reference peak MB | rel. diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        threads = r["threads"] if r["threads"] == "1" else f"default ({default_threads})"
        lines.append(
            f"| {n_test} x {r['n_train']} | {threads} | {r['scheduler']} | {r['influx_s']:.2f} | "
            f"{r['reference_s']:.2f} | {r['reference_s'] / r['influx_s']:.1f}x | "
            f"{r['influx_mb']:.0f} | {r['reference_mb']:.0f} | {r['diff']:.1e} |"
        )
    lines.append("")
    for n_train in sorted({r["n_train"] for r in rows}, reverse=True):
        for threads in ("1", "default"):
            seq, dsk = (
                by_key.get((n_train, threads, "sequential")),
                by_key.get((n_train, threads, "dask")),
            )
            if seq and dsk:
                lines.append(
                    f"- {n_test} x {n_train}, torch threads {threads}: influx Dask (2 workers) is "
                    f"{seq['influx_s'] / dsk['influx_s']:.2f}x the speed of influx sequential "
                    f"(reference: {seq['reference_s'] / dsk['reference_s']:.2f}x)."
                )
    return "\n".join(lines)


def _write_readme(table: str) -> None:
    readme = ROOT / "benchmarks" / "README.md"
    text = readme.read_text()
    header = "## Calculators"
    body = (
        f"{header}\n\n"
        "`benchmarks/bench_calculator.py`: time and peak memory to write the influence matrix of "
        f"the digits MLP (64-{HIDDEN}-10, 1210 parameters, float32, `DirectInfluence`, "
        f"regularization {REGULARIZATION}) to zarr; test chunks of {TEST_CHUNK}, train chunks of "
        f"{TRAIN_CHUNK}; digits tiled with Gaussian noise (sd 0.02). Medians over the repeats; "
        "peak MB is the growth of the resident set size during the write (sequential: the calculator's "
        "process; Dask: the larger worker), sampled every 3 ms. The sequential calculators get "
        "lists of ready (x, y) batches, so that data loading does not enter the comparison. "
        "rel. diff: relative Frobenius difference of the first 500 x 4000 block of the two "
        "stored matrices.\n\n"
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
        worker(*sys.argv[2:5], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7])  # type: ignore[arg-type]
    else:
        main()
