"""EK-FAC benchmark: influx against the reference library, in the same run.

Models: an MLP (64-32-10) and a small CNN on the 8x8 digits of scikit-learn, trained here.
For each library, model and thread setting a fresh subprocess fits EK-FAC on the training
set and computes the influences of the test set on the training set, several times; we report
median fit and influence times, the peak resident memory added by the computation, and the
Pearson / Spearman correlations of the influences with the exact Gauss-Newton (empirical
Fisher) influences of influx's DirectInfluence in float64.

The reference library (pyDVL 0.10.0) runs in its own virtual environment (``--ref-python``);
its EkfacInfluence supports Linear layers and cross-entropy only, so it has no CNN figures.

Usage (from the repository root):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_ekfac.py [--ref-python PATH]

``--ref-python`` defaults to ``$INFLUX_REF_PYTHON``, else ``.venv-ref/bin/python``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

import torch

HERE = Path(__file__).resolve()
LAMBDA = 0.01
BATCH_SIZE = 128
N_TRAIN = 1500
N_TEST = 100


def make_model(kind: str) -> torch.nn.Module:
    if kind == "mlp":
        return torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
        )
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 8, kernel_size=3, padding=1),
        torch.nn.Tanh(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, kernel_size=3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    )


def load_data() -> Dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    gen = np.random.default_rng(0)
    order = gen.permutation(len(digits.target))
    x = torch.tensor(digits.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[order], dtype=torch.long)
    return {
        "x": x[:N_TRAIN],
        "y": y[:N_TRAIN],
        "x_test": x[N_TRAIN : N_TRAIN + N_TEST],
        "y_test": y[N_TRAIN : N_TRAIN + N_TEST],
    }


def train(kind: str, data: Dict[str, torch.Tensor]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = make_model(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"], data["y"]), batch_size=64, shuffle=True
    )
    for _ in range(30):
        for xb, yb in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    with torch.no_grad():
        acc = (model(data["x_test"]).argmax(1) == data["y_test"]).float().mean()
    print(f"{kind}: test accuracy {float(acc):.3f}", file=sys.stderr)
    return model


def exact_influences(model: torch.nn.Module, data: Dict[str, torch.Tensor]) -> np.ndarray:
    sys.path.insert(0, str(HERE.parent.parent / "src"))
    from influx.torch import DirectInfluence, SecondOrderMode

    model64 = make_model_like(model).double()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"].double(), data["y"]), batch_size=BATCH_SIZE
    )
    direct = DirectInfluence(
        model64,
        torch.nn.functional.cross_entropy,
        LAMBDA,
        second_order_mode=SecondOrderMode.GAUSS_NEWTON,
    ).fit(loader)
    values = direct.influences(
        data["x_test"].double(), data["y_test"], data["x"].double(), data["y"]
    )
    return values.numpy()


def make_model_like(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


# ------------------------------------------------------------------------------------------
# worker: runs in a fresh process, in either virtual environment


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakMemory:
    """The peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self) -> "PeakMemory":
        self.base = current_rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())

    @property
    def megabytes(self) -> float:
        return (self.peak - self.base) / 2**20


def worker(args: argparse.Namespace) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    payload = torch.load(args.payload, weights_only=False)
    data = payload["data"]
    model = make_model(args.model)
    model.load_state_dict(payload["state"])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"], data["y"]), batch_size=BATCH_SIZE
    )
    if args.library == "influx":
        sys.path.insert(0, str(HERE.parent.parent / "src"))
        from influx.torch import EkfacInfluence
    else:
        from pydvl.influence.torch import EkfacInfluence  # type: ignore[no-redef]

    def build() -> Any:
        return EkfacInfluence(model, update_diagonal=True, hessian_regularization=LAMBDA)

    batches = list(loader)  # pre-collated: the same data without the DataLoader's cost
    result: Dict[str, Any] = {"fit": [], "fit_batches": [], "influences": []}
    test_and_train = (data["x_test"], data["y_test"], data["x"], data["y"])
    try:
        build().fit(loader).influences(*test_and_train)  # warm-up: lazy imports, caches
        with PeakMemory() as fit_memory:
            fitted = build().fit(loader)
        with PeakMemory() as influence_memory:
            values = fitted.influences(*test_and_train)
        result["fit_mb"] = fit_memory.megabytes
        result["influences_mb"] = influence_memory.megabytes
        for _ in range(args.repeats):
            start = time.perf_counter()
            build().fit(loader)
            result["fit"].append(time.perf_counter() - start)
            start = time.perf_counter()
            fitted = build().fit(batches)
            result["fit_batches"].append(time.perf_counter() - start)
            start = time.perf_counter()
            values = fitted.influences(*test_and_train)
            result["influences"].append(time.perf_counter() - start)
        np.save(args.out + ".npy", values.detach().numpy())
    except Exception as error:  # the reference does not support every layer
        result["error"] = f"{type(error).__name__}: {str(error)[:120]}"
    Path(args.out + ".json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------
# driver


def run_worker(
    python: str, library: str, model: str, threads: int, payload: str, repeats: int, tmp: str
) -> Dict[str, Any]:
    out = os.path.join(tmp, f"{library}-{model}-{threads}")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    cmd = [
        python,
        str(HERE),
        "--worker",
        "--library",
        library,
        "--model",
        model,
        "--threads",
        str(threads),
        "--payload",
        payload,
        "--repeats",
        str(repeats),
        "--out",
        out,
    ]
    subprocess.run(cmd, check=True, env=env)
    result: Dict[str, Any] = json.loads(Path(out + ".json").read_text())
    if "error" not in result:
        result["values"] = np.load(out + ".npy")
    return result


def correlations(values: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    a, b = values.reshape(-1), exact.reshape(-1)
    return float(pearsonr(a, b)[0]), float(spearmanr(a, b)[0])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", default="influx")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--payload", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--ref-python",
        default=os.environ.get("INFLUX_REF_PYTHON", ".venv-ref/bin/python"),
        help="the reference library's interpreter (relative paths: from the repository root)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    data = load_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("mlp", "cnn"):
            model = train(kind, data)
            exact = exact_influences(model, data)
            payload = os.path.join(tmp, f"{kind}.pt")
            torch.save({"state": model.state_dict(), "data": data}, payload)
            for threads in (1, 0):
                results = {
                    library: run_worker(python, library, kind, threads, payload, args.repeats, tmp)
                    for library, python in (
                        ("influx", sys.executable),
                        ("reference", str(HERE.parents[1] / args.ref_python)),
                    )
                }
                rows.append((kind, threads, results, exact))
    print(table(rows))


def table(rows: List[Any]) -> str:
    lines = [
        "| model | threads | library | fit (s) | fit, batches in memory (s) | influences (s) "
        "| peak fit / influences (MB) | Pearson | Spearman | ratios fit / in memory / "
        "influences |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    keys = ("fit", "fit_batches", "influences")
    for kind, threads, results, exact in rows:
        ours = {k: statistics.median(results["influx"][k]) for k in keys}
        for library, result in results.items():
            label = "1" if threads == 1 else "default"
            if "error" in result:
                lines.append(
                    f"| {kind} | {label} | {library} | n/a | n/a | n/a | n/a | n/a | n/a | "
                    f"not supported ({result['error'].split(':')[0]}) |"
                )
                continue
            median = {k: statistics.median(result[k]) for k in keys}
            pearson, spearman = correlations(result["values"], exact)
            ratios = " / ".join(f"{median[k] / ours[k]:.2f}" for k in keys)
            lines.append(
                f"| {kind} | {label} | {library} | {median['fit']:.4f} | "
                f"{median['fit_batches']:.4f} | {median['influences']:.4f} | "
                f"{result['fit_mb']:.1f} / {result['influences_mb']:.1f} | {pearson:.3f} | "
                f"{spearman:.3f} | {ratios} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
