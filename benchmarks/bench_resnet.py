"""ResNet-18 benchmark: EK-FAC, CG and the projection on an 11.2 M-parameter model with BatchNorm.

Model: the standard CIFAR-style ResNet-18 (a 3x3 stem convolution with 64 channels, four
stages of two BasicBlocks with 64, 128, 256 and 512 channels, BatchNorm after every
convolution, 1x1 projection shortcuts where the shape changes, global average pooling and a
linear layer; 11,173,962 parameters), defined here (torchvision is not a dependency), random
initialisation, trained a few epochs with SGD on scikit-learn's digits upsampled to 3x32x32
(the 8x8 image interpolated bilinearly and repeated over 3 channels, standardised), then put
in eval mode for influence. The trained weights and the data are kept in the output
directory, so repeated runs skip the training.

Every method runs in a fresh subprocess, fitted on the first 1,000 training images with the
same $\\lambda$ and the empirical Fisher (Gauss-Newton) curvature, and computes the influence
matrix of test points on those 1,000 images in memory (`influences`):

* `ekfac`: `EkfacInfluence(update_diagonal=True)` with its layer defaults (every `Conv2d` and
  `Linear`, the BatchNorm parameters held fixed by `other_layers="freeze"`), 100 x 1,000, with
  a per-phase breakdown of the fit and of the matrix;
* `projected`: `ProjectedInfluence` with its default projection and dimension, 100 x 1,000,
  its diagnostics printed;
* `cg`: `CgInfluence(second_order_mode=GAUSS_NEWTON)` over all parameters, solved to a tight
  tolerance (the reference), for the first `--cg-test` test points (every iteration is one
  pass of per-sample gradients over the 1,000 images, shared by all right-hand sides);
* `exact`: the value CG converges to, by the Woodbury identity from the Gram matrix of the
  per-sample gradients of the fit and CG test points (`exact_gauss_newton_influences`; a
  float32 memory map of $(n + n_{test}) \times P$ values on disk, little memory).

Each reports its times and the peak resident memory of its process (`ru_maxrss`, the VmHWM
high-water mark, absolute and as growth over the process after loading model and data). The
parent compares EK-FAC and the projection with the exact solve, or CG if it is absent
(Pearson and Spearman on the `cg_test x 100` sub-matrix, the first 100 training images) and prints the machine's matmul
throughput and load average.

Usage (from the repository root):

    PYTHONPATH=src python benchmarks/bench_resnet.py [--methods ekfac,projected,cg]
        [--cg-test 100] [--write-readme]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
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

from common import markdown_table, matmul_gflops, replace_readme_section  # noqa: E402

SEED = 0
N_FIT = 1000
N_TEST = 100
N_SUB = 100  # training columns of the sub-matrix compared with CG


# --------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------


class BasicBlock(torch.nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (a 1x1 convolution and
    BatchNorm on the shortcut when the stride or the channels change)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c_out)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c_out)
        self.shortcut: torch.nn.Module = torch.nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = torch.nn.Sequential(
                torch.nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                torch.nn.BatchNorm2d(c_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(torch.nn.Module):
    """The CIFAR-style ResNet-18 for 3x32x32 inputs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(64)
        stages: List[torch.nn.Module] = []
        c_in = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                torch.nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1))
            )
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = torch.nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)  # type: ignore[no-any-return]


def make_data() -> Dict[str, torch.Tensor]:
    """The digits upsampled to 32x32, repeated to 3 channels and standardised; 297 test
    images and 1,500 training images (a fixed permutation)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(SEED).permutation(len(x))
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    big = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear")
    big = big.repeat(1, 3, 1, 1)
    big = (big - big.mean()) / big.std()
    labels = torch.tensor(y, dtype=torch.long)
    test, train = torch.from_numpy(order[:297]), torch.from_numpy(order[297:])
    return {"x": big[train], "y": labels[train], "x_test": big[test], "y_test": labels[test]}


def prepare(workdir: Path, epochs: int) -> Dict[str, Any]:
    """Data and a trained model, saved once in `workdir` (reused when present)."""
    info_file = workdir / "training.json"
    if (workdir / "model.pt").exists() and info_file.exists():
        return json.loads(info_file.read_text())  # type: ignore[no-any-return]
    start = time.perf_counter()
    data = make_data()
    torch.manual_seed(SEED)
    net = ResNet18()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x"], data["y"]), batch_size=64, shuffle=True
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.05, total_steps=epochs * len(loader)
    )
    net.train()
    for epoch in range(epochs):
        total = 0.0
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xb), yb)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(xb)
        print(f"epoch {epoch + 1}: training loss {total / len(data['x']):.4f}", flush=True)
    net.eval()
    with torch.no_grad():
        accuracy = float((net(data["x_test"]).argmax(1) == data["y_test"]).float().mean())
    torch.save(net.state_dict(), workdir / "model.pt")
    torch.save(data, workdir / "data.pt")
    info = {
        "n_parameters": sum(p.numel() for p in net.parameters()),
        "test_accuracy": accuracy,
        "epochs": epochs,
        "train_seconds": time.perf_counter() - start,
    }
    info_file.write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------------------------
# One method in its own process
# --------------------------------------------------------------------------------------------


def _peak_mb() -> float:
    # Linux reports ru_maxrss (VmHWM) in kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _PhaseTimer:
    """Wall time spent in named methods of objects, patched for the duration of a run."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}

    def wrap(self, owner: Any, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, attribute, timed)


def _ekfac_phases() -> _PhaseTimer:
    """Time the phases of an EK-FAC fit and matrix by wrapping the library's functions:
    the factors' pass, their eigendecompositions, the eigenvalue refit, the test factors and
    the scoring of the training points."""
    from influx.torch.kfac import factors, scoring

    timer = _PhaseTimer()
    timer.wrap(factors, "collect_kronecker_factors", "factors")
    timer.wrap(factors, "eigendecompose_factors", "eigendecomposition")
    timer.wrap(factors, "refit_eigenvalues", "eigenvalue correction")
    timer.wrap(scoring.KroneckerBlockMapper, "_lean_factors", "test factors")
    timer.wrap(scoring.KroneckerBlockMapper, "_training_scores", "scoring")
    return timer


def exact_gauss_newton_influences(
    net: torch.nn.Module,
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    lam: float,
    path: Path,
    chunk: int = 5,
) -> torch.Tensor:
    r"""The exact influences $g_t^\top (\frac1n G^\top G + \lambda I)^{-1} g_j$ of the test
    points on the fit points by the Woodbury identity, the value CG converges to:

    $$
    \frac{1}{\lambda}\Big(g_t^\top g_j - (G g_t)^\top (n\lambda I + G G^\top)^{-1}
    G g_j\Big),
    $$

    with $G$ `(n, P)` the per-sample gradients of the fit points (all parameters). Only the
    Gram matrices of the $n + n_{test}$ gradients are needed: the gradients are computed a
    few points at a time with `torch.func` into a float32 memory map at `path`, and their
    products taken over slices of the parameters, in float64.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: p.detach() for k, p in net.named_parameters()}
    buffers = {k: b.detach() for k, b in net.named_buffers()}

    def sample_loss(p: Dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(net, (p, buffers), (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    x_all, y_all = torch.cat([x_fit, x_test]), torch.cat([y_fit, y_test])
    total = len(x_all)
    n_params = sum(p.numel() for p in params.values())
    grads = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(total, n_params))
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        values = per_sample(params, x_all[start:stop], y_all[start:stop])
        grads[start:stop] = torch.cat([v.reshape(stop - start, -1) for v in values.values()], 1)
    gram = np.zeros((total, total))
    step = 250_000
    for s in range(0, n_params, step):
        block = np.asarray(grads[:, s : s + step], dtype=np.float64)
        gram += block @ block.T
    del grads
    path.unlink()
    n = len(x_fit)
    k, c = gram[:n, :n], gram[:n, n:]
    solved = np.linalg.solve(n * lam * np.eye(n) + k, k)  # (n lam I + K)^{-1} G g_j
    return torch.from_numpy((c.T - c.T @ solved) / lam)


def worker(workdir: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    from influx.torch import CgInfluence, EkfacInfluence, ProjectedInfluence
    from influx.torch.curvature.operators import SecondOrderMode

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    method = options["method"]
    if options["threads"]:
        torch.set_num_threads(int(options["threads"]))
    net = ResNet18()
    net.load_state_dict(torch.load(workdir / "model.pt", weights_only=True))
    net.eval()
    data = torch.load(workdir / "data.pt", weights_only=True)
    n_fit = options["n_fit"]
    x_fit, y_fit = data["x"][:n_fit], data["y"][:n_fit]
    n_test = options["cg_test"] if method in ("cg", "exact") else options["n_test"]
    x_test, y_test = data["x_test"][:n_test], data["y_test"][:n_test]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_fit, y_fit),
        batch_size=options["cg_batch"] if method == "cg" else options["batch"],
    )
    loss = torch.nn.functional.cross_entropy
    lam = options["regularization"]
    timer = _ekfac_phases() if method == "ekfac" else None
    baseline = _peak_mb()
    model: Any
    if method == "ekfac":
        model = EkfacInfluence(net, update_diagonal=True, regularization=lam, loss=loss)
    elif method == "projected":
        model = ProjectedInfluence(net, loss, regularization=lam, seed=SEED)
    elif method == "cg":
        model = CgInfluence(
            net,
            loss,
            regularization=lam,
            rtol=options["cg_rtol"],
            maxiter=options["cg_maxiter"],
            second_order_mode=SecondOrderMode.GAUSS_NEWTON,
            progress=True,
        )
    elif method != "exact":
        raise ValueError(f"Unknown method {method!r}.")
    if method == "exact":
        start = time.perf_counter()
        values = exact_gauss_newton_influences(
            net, x_fit, y_fit, x_test, y_test, lam, workdir / "grads.npy"
        )
        fitted = done = time.perf_counter()
        np.save(workdir / f"exact-{n_fit}.npy", values.numpy())
        return {
            "method": method,
            "matrix": list(values.shape),
            "fit_seconds": 0.0,
            "matrix_seconds": done - start,
            "total_seconds": done - start,
            "peak_mb": _peak_mb(),
            "peak_growth_mb": _peak_mb() - baseline,
            "threads": torch.get_num_threads(),
        }
    start = time.perf_counter()
    model.fit(loader)
    fitted = time.perf_counter()
    chunk = options["test_chunk"] or len(x_test)
    values = torch.cat(
        [
            model.influences(x_test[i : i + chunk], y_test[i : i + chunk], x_fit, y_fit)
            for i in range(0, len(x_test), chunk)
        ]
    )
    done = time.perf_counter()
    matrix_file = workdir / f"{method}-{n_fit}.npy"
    np.save(matrix_file, values.detach().numpy())
    result: Dict[str, Any] = {
        "method": method,
        "matrix": list(values.shape),
        "fit_seconds": fitted - start,
        "matrix_seconds": done - fitted,
        "total_seconds": done - start,
        "peak_mb": _peak_mb(),
        "peak_growth_mb": _peak_mb() - baseline,
        "threads": torch.get_num_threads(),
        "path": str(matrix_file),
    }
    if method == "cg":
        result["diagnostics"] = {
            name: None if d is None else str(d) for name, d in model.solver_diagnostics.items()
        }
    if method == "projected":
        result["projected_sizes"] = model.projected_sizes
        result["solver_diagnostics"] = {
            name: None if d is None else str(d) for name, d in model.solver_diagnostics.items()
        }
        for attribute in ("diagnostics", "projection_diagnostics", "distortion"):
            if hasattr(model, attribute):
                result[attribute] = str(getattr(model, attribute))
    if method == "ekfac":
        result["layers"] = len(model.layer_specs)
    if timer is not None:
        result["phases"] = {k: round(v, 1) for k, v in timer.seconds.items()}
    return result


# --------------------------------------------------------------------------------------------
# Comparison and report
# --------------------------------------------------------------------------------------------


def compare(reference: np.ndarray, other: np.ndarray) -> Dict[str, float]:
    """Pearson and Spearman of `other` against `reference` on the reference's rows and the
    first `N_SUB` columns."""
    from scipy.stats import pearsonr, spearmanr

    rows = reference.shape[0]
    a = reference[:, :N_SUB].astype(np.float64).ravel()
    b = other[:rows, :N_SUB].astype(np.float64).ravel()
    return {"pearson": float(pearsonr(a, b)[0]), "spearman": float(spearmanr(a, b)[0])}


def _run(workdir: Path, options: Dict[str, Any]) -> Dict[str, Any]:
    command = [sys.executable, str(HERE), "--workdir", str(workdir), "--worker"]
    output = subprocess.run(
        command + [json.dumps(options)], capture_output=True, text=True, check=False
    )
    if output.returncode != 0:
        raise RuntimeError(f"{options['method']} failed:\n{output.stderr[-3000:]}")
    for line in output.stderr.splitlines():
        if "INFO" in line or "WARNING" in line:
            print(f"  [{options['method']}] {line}", flush=True)
    return json.loads(output.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def table(results: Dict[str, Dict[str, Any]], agreement: Dict[str, Dict[str, float]]) -> str:
    names = {
        "ekfac": "EkfacInfluence (update_diagonal, layer defaults)",
        "projected": "ProjectedInfluence (defaults)",
        "cg": "CgInfluence (Gauss-Newton, all parameters)",
        "exact": "exact Gauss-Newton solve (Woodbury, all parameters)",
    }
    rows = []
    for method, r in results.items():
        shape = " x ".join(f"{n:,}" for n in r["matrix"])
        versus = agreement.get(method)
        accuracy = f"{versus['pearson']:.3f} / {versus['spearman']:.3f}" if versus else "-"
        rows.append(
            [
                names[method],
                shape,
                f"{r['fit_seconds']:.0f}",
                f"{r['matrix_seconds']:.0f}",
                f"**{r['total_seconds']:.0f}**",
                f"{r['peak_mb']:.0f} ({r['peak_growth_mb']:.0f})",
                accuracy,
            ]
        )
    header = [
        "method",
        "matrix",
        "fit s",
        "matrix s",
        "total s",
        "peak MB (growth)",
        "Pearson / Spearman vs the reference",
    ]
    return markdown_table(header, rows)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--methods",
        default="ekfac,projected,cg",
        help="of ekfac, projected, cg and exact (the Woodbury solve of the Gauss-Newton system "
        "for the CG test points); empty: only compare the saved matrices",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--n-fit", type=int, default=N_FIT, help="training points of the fits and the matrix"
    )
    parser.add_argument("--n-test", type=int, default=N_TEST, help="test points of the matrix")
    parser.add_argument("--regularization", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=50, help="training batch of the fits")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: default")
    parser.add_argument(
        "--test-chunk",
        type=int,
        default=50,
        help="test points per influences() call (each holds its test factors: 45 MB a point)",
    )
    parser.add_argument("--cg-test", type=int, default=10, help="test points solved by CG")
    parser.add_argument("--cg-rtol", type=float, default=1e-3)
    parser.add_argument("--cg-maxiter", type=int, default=30)
    parser.add_argument(
        "--cg-batch", type=int, default=25, help="training batch of CG's per-sample gradients"
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--write-readme", action="store_true")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / "influx-resnet")
    workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        print(json.dumps(worker(workdir, json.loads(args.worker))))
        return
    training = prepare(workdir, args.epochs)
    print(f"model: {training}", flush=True)
    load = os.getloadavg()
    throughput = {t: matmul_gflops(t) for t in (1, torch.get_num_threads())}
    print(
        "matmul 2048x2048 float32: "
        + ", ".join(f"{g:.0f} GFLOP/s at {t} thread(s)" for t, g in throughput.items())
        + f"; load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        flush=True,
    )
    results: Dict[str, Dict[str, Any]] = {}
    for method in [m for m in args.methods.split(",") if m]:
        options = {
            "method": method,
            "n_fit": args.n_fit,
            "n_test": args.n_test,
            "test_chunk": args.test_chunk,
            "threads": args.threads,
            "batch": args.batch,
            "regularization": args.regularization,
            "cg_test": args.cg_test,
            "cg_rtol": args.cg_rtol,
            "cg_maxiter": args.cg_maxiter,
            "cg_batch": args.cg_batch,
        }
        results[method] = _run(workdir, options)
        print(json.dumps(results[method]), flush=True)
    agreement: Dict[str, Dict[str, float]] = {}
    # the exact solve when present (what converged CG converges to), else CG
    for reference_name in ("exact", "cg"):
        reference_file = workdir / f"{reference_name}-{args.n_fit}.npy"
        if reference_file.exists():
            break
    if reference_file.exists():
        reference = np.load(reference_file)
        for method in ("ekfac", "projected", "cg"):
            other = workdir / f"{method}-{args.n_fit}.npy"
            if method != reference_name and other.exists():
                agreement[method] = compare(reference, np.load(other))
        columns = min(N_SUB, reference.shape[1])
        print(
            f"agreement with {reference_name} ({reference.shape[0]} x {columns}): {agreement}",
            flush=True,
        )
    text = table(results, agreement)
    print(text)
    if args.write_readme:
        replace_readme_section("bench_resnet", text)


if __name__ == "__main__":
    main()
