"""ProjectedInfluence: accuracy against the projected dimension, time and memory.

Workloads of `common.py`: the digits MLP (2,410 parameters) and the 100k MLP (99,126), with
their data (64 test x 1000 train influence matrix) and regularization 0.01. The curvature
is the empirical Fisher (Gauss-Newton) throughout; the reference is its exact influence in
float64: `DirectInfluence` for the digits MLP and, for the 100k MLP, the Woodbury identity
$g'^\\top(\\frac1n G^\\top G + \\lambda I)^{-1} g = \\frac1\\lambda(g'^\\top g - g'^\\top G^\\top
(n\\lambda I + G G^\\top)^{-1} G g)$ with the $n \\times P$ per-sample gradients $G$ (exact, no
iteration). Each case (float32, one fresh subprocess) reports fit and influence times and its
peak resident memory increase; accuracy is the Pearson and Spearman correlation of the
influence matrix with the reference.

A third table (`--distortion`) measures the default projected dimension and the distortion
estimate on a CNN of 105,226 parameters (two 3x3 convolutions with 16 and 32 channels,
max-pooling, linear layers 512-192-10) trained on the 8x8 digits (1,000 training images, Adam,
float32): for each projection, $k$ and seed, the Pearson and Spearman correlations of the
64 x 1,000 influence matrix with the exact Gauss-Newton influence (Woodbury, float64,
$\\lambda = 0.01$), beside the estimate `projection_distortion` of the fitted model and the
dimension it suggests.

A second table measures the peak memory of the Kronecker projection's fit for MLPs
64-w-w-10 of two widths, two projected dimensions and two batch sizes.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/bench_projected.py [--no-baseline] [--skip-memory]
    PYTHONPATH=src python benchmarks/bench_projected.py --distortion

The 100k MLP is trained by `common.prepare` the first time (several minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

import torch

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from common import WORKLOADS, cache_dir, load_workload, prepare  # noqa: E402

README = HERE.parent / "README.md"
KS = (64, 256, 1024, 4096)
GN = "gauss_newton"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One case: fit and a (64, 1000) influence matrix, float32."""
    from torch.utils.data import DataLoader, TensorDataset

    from influx.torch import CgInfluence, DirectInfluence, ProjectedInfluence

    torch.set_num_threads(1)
    loss = torch.nn.functional.cross_entropy
    if spec["kind"] == "width":
        torch.manual_seed(0)
        width = spec["width"]
        net = torch.nn.Sequential(
            torch.nn.Linear(64, width),
            torch.nn.Tanh(),
            torch.nn.Linear(width, width),
            torch.nn.Tanh(),
            torch.nn.Linear(width, 10),
        )
        x = torch.randn(2048, 64)
        y = torch.randint(0, 10, (2048,))
        data = {"x_train": x, "y_train": y}
        lam = 0.01
    else:
        workload = WORKLOADS[spec["workload"]]
        net, data = load_workload(workload, torch.float32)
        lam = workload.regularization
    train = DataLoader(
        TensorDataset(data["x_train"], data["y_train"]), batch_size=spec.get("batch", 256)
    )
    baseline = _rss_mb()
    start = time.perf_counter()
    if spec["method"] == "direct":
        model: Any = DirectInfluence(net, loss, lam, second_order_mode=GN)
    elif spec["method"] == "cg":
        model = CgInfluence(
            net, loss, lam, second_order_mode=GN, rtol=1e-6, atol=1e-8, maxiter=spec["maxiter"]
        )
    else:
        model = ProjectedInfluence(net, loss, spec["k"], spec["projection"], regularization=lam)
    model.fit(train)
    fitted = time.perf_counter()
    result: Dict[str, Any] = {"fit_seconds": fitted - start}
    if spec["kind"] != "width":
        values = model.influences(data["x_test"], data["y_test"], data["x_infl"], data["y_infl"])
        result["influence_seconds"] = time.perf_counter() - fitted
        np.save(spec["output"], values.detach().double().numpy())
    result["peak_mb"] = _rss_mb() - baseline
    if spec["method"] == "projected":
        result["k_actual"] = model.factor_size
    return result


def reference(workload_name: str) -> np.ndarray:
    """The exact Gauss-Newton influences (64, 1000) in float64, cached."""
    path = cache_dir() / workload_name / "exact_gn.npy"
    if path.exists():
        return np.load(path)
    from torch.func import functional_call, grad, vmap

    workload = WORKLOADS[workload_name]
    net, data = load_workload(workload, torch.float64)
    params = {n: p.detach() for n, p in net.named_parameters()}
    loss = workload.loss

    def single(p: Dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(net, p, (x[None],)), y[None])

    per_sample = vmap(grad(single), in_dims=(None, 0, 0))

    def grads(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, len(x), 128):
            g = per_sample(params, x[start : start + 128], y[start : start + 128])
            parts.append(torch.cat([v.flatten(1) for v in g.values()], dim=1))
        return torch.cat(parts)

    lam = workload.regularization
    g_train = grads(data["x_train"], data["y_train"])  # (n, P)
    g_test = grads(data["x_test"], data["y_test"])
    g_infl = grads(data["x_infl"], data["y_infl"])
    n = g_train.shape[0]
    kernel = g_train @ g_train.T + n * lam * torch.eye(n, dtype=torch.float64)
    left = g_test @ g_train.T  # (64, n)
    right = g_train @ g_infl.T  # (n, 1000)
    result = (g_test @ g_infl.T - left @ torch.linalg.solve(kernel, right)) / lam
    np.save(path, result.numpy())
    return result.numpy()


def run(spec: Dict[str, Any]) -> Dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(HERE), "--worker", json.dumps(spec)]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if output.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def correlations(values: np.ndarray, exact: np.ndarray) -> Dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    return {
        "pearson": float(pearsonr(values.ravel(), exact.ravel())[0]),
        "spearman": float(spearmanr(values.ravel(), exact.ravel())[0]),
    }


def accuracy_table(
    workloads: List[str], projections: List[str], baseline: bool = True
) -> List[str]:
    rows = [
        "| workload | parameters | method | k | Pearson | Spearman | fit s | influences s "
        "| peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in workloads:
        workload = WORKLOADS[name]
        prepare(workload)
        exact = reference(name)
        n_params = workload.n_parameters
        output = str(cache_dir() / name / "projected_case.npy")
        base: Dict[str, Any] = {"kind": "accuracy", "workload": name, "output": output}
        cases: List[Any] = []
        if baseline and n_params <= 20_000:
            cases = [("direct", {**base, "method": "direct"})]
        elif baseline:
            cases = [("cg", {**base, "method": "cg", "maxiter": 100})]
        for projection in projections:
            for k in KS:
                if k >= 2 * n_params or (projection != "kronecker" and k * n_params > 2**26):
                    continue  # beyond P; or a dense matrix over 512 MB, generated per batch
                spec = {**base, "method": "projected", "projection": projection, "k": k}
                cases.append((projection, spec))
        for label, spec in cases:
            result = run(spec)
            corr = correlations(np.load(output), exact)
            k = result.get("k_actual", "-")
            rows.append(
                f"| {name} | {n_params} | {label} | {k} | {corr['pearson']:.3f} | "
                f"{corr['spearman']:.3f} | {result['fit_seconds']:.2f} | "
                f"{result['influence_seconds']:.2f} | {result['peak_mb']:.0f} |"
            )
            print(rows[-1], flush=True)
    return rows


def memory_table() -> List[str]:
    rows = ["| width | parameters | k | batch | fit s | peak MB |", "|---|---|---|---|---|---|"]
    for width in (256, 1024):
        n_params = 64 * width + width + width * width + width + width * 10 + 10
        for k in (256, 4096):
            for batch in (64, 512):
                spec = {"kind": "width", "width": width, "k": k, "batch": batch}
                result = run({**spec, "method": "projected", "projection": "kronecker"})
                rows.append(
                    f"| {width} | {n_params} | {k} | {batch} | {result['fit_seconds']:.2f} | "
                    f"{result['peak_mb']:.0f} |"
                )
                print(rows[-1], flush=True)
    return rows


def digits_cnn() -> "tuple[torch.nn.Module, Dict[str, torch.Tensor]]":
    """The CNN of the distortion table, trained on 1,000 digits (float64 copy returned)."""
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    x = torch.tensor(x_all / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y_all)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(512, 192),
        torch.nn.ReLU(),
        torch.nn.Linear(192, 10),
    )
    x_train, y_train = x[:1000], y[:1000]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(30):
        for start in range(0, 1000, 50):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                net(x_train[start : start + 50]), y_train[start : start + 50]
            )
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(x[1000:]).argmax(1) == y[1000:]).double().mean().item()
    print(f"digits CNN: {sum(p.numel() for p in net.parameters())} parameters, "
          f"held-out accuracy {accuracy:.3f}", flush=True)  # fmt: skip
    data = {"x_train": x_train, "y_train": y_train, "x_test": x[1000:1064], "y_test": y[1000:1064]}
    return net, data


def exact_gauss_newton(
    net: torch.nn.Module, data: Dict[str, torch.Tensor], lam: float
) -> np.ndarray:
    """The exact empirical-Fisher influence (64, 1000) in float64 (Woodbury identity)."""
    from torch.func import functional_call, grad, vmap

    net64 = __import__("copy").deepcopy(net).double()
    params = {n: p.detach() for n, p in net64.named_parameters()}

    def single(p: Dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(net64, p, (x[None],))
        return torch.nn.functional.cross_entropy(logits, y[None])

    per_sample = vmap(grad(single), in_dims=(None, 0, 0))

    def grads(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, len(x), 100):
            g = per_sample(params, x[start : start + 100].double(), y[start : start + 100])
            parts.append(torch.cat([v.flatten(1) for v in g.values()], dim=1))
        return torch.cat(parts)

    g_train, g_test = grads(data["x_train"], data["y_train"]), grads(data["x_test"], data["y_test"])
    n = g_train.shape[0]
    kernel = g_train @ g_train.T + n * lam * torch.eye(n, dtype=torch.float64)
    left = g_test @ g_train.T
    result = (left - left @ torch.linalg.solve(kernel, g_train @ g_train.T)) / lam
    return result.numpy()  # type: ignore[no-any-return]


def distortion_table(seeds: int = 3) -> List[str]:
    """Pearson of the projection against the exact influence, and its distortion estimate."""
    from torch.utils.data import DataLoader, TensorDataset

    from influx.torch import ProjectedInfluence

    lam = 0.01
    path = cache_dir() / "digits_cnn"
    path.mkdir(parents=True, exist_ok=True)
    if (path / "exact_gn.npy").exists():
        net, data = torch.load(path / "model.pt", weights_only=False)
        exact = np.load(path / "exact_gn.npy")
    else:
        net, data = digits_cnn()
        exact = exact_gauss_newton(net, data, lam)
        torch.save((net, data), path / "model.pt")
        np.save(path / "exact_gn.npy", exact)
    train = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=250)
    rows = [
        "| projection | k | seed | Pearson | Spearman | distortion | suggested k | fit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cases = [("kronecker", k) for k in (64, 256, None, 4096)] + [
        ("gaussian", k) for k in (64, 256, None)
    ]
    for projection, k in cases:
        for seed in range(seeds):
            start = time.perf_counter()
            model = ProjectedInfluence(
                net, torch.nn.functional.cross_entropy, k, projection, regularization=lam,
                seed=seed, max_cache_mb=1024,
            ).fit(train)  # fmt: skip
            fit_seconds = time.perf_counter() - start
            values = model.influences(
                data["x_test"], data["y_test"], data["x_train"], data["y_train"]
            )
            corr = correlations(values.detach().double().numpy(), exact)
            estimate = model.projection_distortion["model"]
            assert estimate is not None
            label = f"{model.factor_size}" + (" (default)" if k is None else "")
            rows.append(
                f"| {projection} | {label} | {seed} | {corr['pearson']:.3f} | "
                f"{corr['spearman']:.3f} | {estimate.distortion:.2f} | "
                f"{estimate.suggested_dim} | {fit_seconds:.1f} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", default="mlp_small_digits,mlp_100k_digits")
    parser.add_argument("--projections", default="kronecker,gaussian")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--distortion", action="store_true", help="only the distortion table (digits CNN)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="no Direct / CG case")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.distortion:
        distortion_table()
        return
    accuracy_table(args.workloads.split(","), args.projections.split(","), not args.no_baseline)
    if not args.skip_memory:
        memory_table()


if __name__ == "__main__":
    main()
