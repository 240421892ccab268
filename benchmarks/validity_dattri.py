"""dattri's scores on the workloads of the validity benchmark, for the LDS comparison.

Runs in dattri's own environment (dattri 0.3.0 with torch 2.13.0; neither influx nor sklearn
is imported), on what `benchmarks/validity.py --export` wrote to `<out>/export/<workload>/`:
the training and test data, the flat weights of the seed-0 model and, in `settings.json`,
the lambda at which influx ran each method. For every method both libraries implement, it
computes dattri's (n_test, n_train) score matrix at the same lambda on the same model and
writes it to `<out>/dattri/<workload>/<influx method>-<lambda>.npy`, with its time in
`<out>/dattri/results.jsonl`; `validity.py --table` scores it on the same ground truth.

    python -m venv .venv-dattri
    .venv-dattri/bin/pip install torch==2.13.0 && .venv-dattri/bin/pip install dattri==0.3.0
    .venv-dattri/bin/python benchmarks/validity_dattri.py --out validity-out

Correspondence (dattri class <-> influx method): IFAttributorExplicit <-> direct-H,
IFAttributorCG <-> cg-H, IFAttributorArnoldi <-> arnoldi-H (proj_dim = influx's rank),
IFAttributorDataInf <-> ihm-GN, IFAttributorEKFAC <-> ekfac (nn.Linear layers only in
dattri: the CNN's convolutions are left out there). The training data goes in one batch,
so that dattri's Hessian is that of the mean loss over all points, as influx's.
dattri's score g_train^T H^-1 g_test has influx's sign (positive = helpful).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np

import torch

logger = logging.getLogger("validity_dattri")

GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
"""The lambda grid of validity.py."""


def make(kind: str) -> torch.nn.Module:
    """The architectures of validity.py (the weights are loaded from the export)."""
    nn = torch.nn
    net: torch.nn.Module
    if kind == "logreg":
        net = nn.Sequential(nn.Linear(64, 10))
    elif kind == "mlp":
        net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    else:
        net = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.Tanh(),
            nn.Conv2d(4, 8, 3),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(128, 10),
        )
    return net.double()


def attributors(rank: int) -> Dict[str, Callable[[Any, float], Any]]:
    from dattri.algorithm.influence_function import (
        IFAttributorArnoldi,
        IFAttributorCG,
        IFAttributorDataInf,
        IFAttributorEKFAC,
        IFAttributorExplicit,
    )

    return {
        "direct-H": lambda task, lam: IFAttributorExplicit(task, regularization=lam),
        "cg-H": lambda task, lam: IFAttributorCG(task, max_iter=500, tol=1e-10, regularization=lam),
        "arnoldi-H": lambda task, lam: IFAttributorArnoldi(
            task, proj_dim=rank, max_iter=2 * rank, regularization=lam
        ),
        "ihm-GN": lambda task, lam: IFAttributorDataInf(task, regularization=lam),
        "ekfac": lambda task, lam: IFAttributorEKFAC(task, damping=lam),
    }


def attribute(
    kind: str,
    data: Dict[str, torch.Tensor],
    builder: Callable[[Any, float], Any],
    lam: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """dattri's (n_test, n_train) scores of the exported seed-0 model of `kind`."""
    from dattri.task import AttributionTask

    net = make(kind)
    torch.nn.utils.vector_to_parameters(data["weights"], net.parameters())
    net = net.to(dtype)
    checkpoint = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def loss(params: Any, batch: Any) -> torch.Tensor:
        x, y = batch
        out = torch.func.functional_call(net, params, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    train = torch.utils.data.TensorDataset(data["x_train"].to(dtype), data["y_train"])
    test = torch.utils.data.TensorDataset(data["x_test"].to(dtype), data["y_test"])
    full = torch.utils.data.DataLoader(train, batch_size=len(train))
    task = AttributionTask(loss_func=loss, model=net, checkpoints=checkpoint)
    attributor = builder(task, lam)
    attributor.cache(full)
    scores = attributor.attribute(
        torch.utils.data.DataLoader(train, batch_size=len(train)),
        torch.utils.data.DataLoader(test, batch_size=len(test)),
    )
    return scores.T.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("validity-out"))
    parser.add_argument("--workloads", nargs="+", default=["logreg", "mlp", "cnn"])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--ekfac-grid", action="store_true", help="EK-FAC on the whole lambda grid")
    parser.add_argument("--rank", type=int, default=50, help="influx's Arnoldi rank")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    builders = attributors(args.rank)
    results = args.out / "dattri" / "results.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    for kind in args.workloads:
        folder = args.out / "export" / kind
        if not folder.exists():
            logger.info("%s: no export in %s, skipped", kind, folder)
            continue
        data = {
            name: torch.from_numpy(np.load(folder / f"{name}.npy"))
            for name in ("x_train", "y_train", "x_test", "y_test", "weights")
        }
        lams: Dict[str, float] = json.loads((folder / "settings.json").read_text())["lams"]
        runs = [(m, lams[m]) for m in args.methods or list(builders) if m in lams]
        if args.ekfac_grid:  # dattri's EK-FAC damping is on another scale: the whole grid
            runs += [("ekfac", lam) for lam in GRID if lam != lams.get("ekfac")]
        for method, lam in runs:
            row: Dict[str, Any] = {"workload": kind, "method": method, "lam": f"{lam:g}"}
            start = time.perf_counter()
            for dtype in (torch.float64, torch.float32):
                # some dattri attributors mix float32 into float64 models: then float32
                try:
                    scores = attribute(kind, data, builders[method], lam, dtype)
                except RuntimeError as error:
                    row["error"] = f"{type(error).__name__}: {error}"[:300]
                    logger.info("%s %s (%s): %s", kind, method, dtype, row["error"])
                    if "dtype" not in str(error):
                        break
                    start = time.perf_counter()
                else:
                    row.pop("error", None)
                    row["dtype"] = str(dtype).replace("torch.", "")
                    path = results.parent / kind / f"{method}-{lam:g}.npy"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, scores.to(torch.float64).numpy())
                    break
            row["seconds"] = time.perf_counter() - start
            with results.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            logger.info("%s %s lambda=%g: %.1f s", kind, method, lam, row["seconds"])


if __name__ == "__main__":
    main()
