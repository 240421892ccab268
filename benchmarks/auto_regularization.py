"""What `regularization="auto"` chooses: tr(C) / P per block (a tenth for EK-FAC), on three models.

The digits logistic regression and the digits MLP (64-32-10) of `validity.py`
(500 training points, L-BFGS with weight decay 1e-3, seed 0) and the small CNN of
`bench_ekfac.py` (1500 training points, Adam), all in float64. For each curvature (the Hessian,
DirectInfluence's default, and the empirical Fisher, `GAUSS_NEWTON`) the script prints the
lambda that "auto" chooses, tr(C) / P, the extreme eigenvalues of C (dense, `eigvalsh`), and
the condition number of C + lambda I that the direct solve reports. The CNN's Hessian is not
formed: its lambda is the one `CgInfluence` chooses from a Hutchinson estimate of the trace
(8 probes), without eigenvalues. For EK-FAC (MLP, CNN), the lambda it chooses per layer
(0.1 times the mean of the Kronecker eigenvalues s).

    PYTHONPATH=src python benchmarks/auto_regularization.py [--readme]

With `--readme` the table replaces the `auto_regularization` section of benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Dict, List, Tuple

import numpy as np
from bench_ekfac import load_data as load_cnn_data
from bench_ekfac import train as train_cnn
from common import machine_note, markdown_table, replace_readme_section
from torch.utils.data import DataLoader, TensorDataset
from validity import Digits

import torch
from influx.torch import CgInfluence, DirectInfluence, EkfacInfluence, SecondOrderMode

MODES = (("Hessian", SecondOrderMode.HESSIAN), ("empirical Fisher", SecondOrderMode.GAUSS_NEWTON))


def models() -> Dict[str, Tuple[torch.nn.Module, DataLoader]]:
    """The three trained models (float64) and their training loaders."""
    result = {}
    for kind, name in (("logreg", "digits logistic regression"), ("mlp", "digits MLP")):
        problem = Digits(kind, n_train=500, n_test=100)
        net = problem.train(np.arange(len(problem.x)), seed=0)
        result[name] = (net, DataLoader(TensorDataset(problem.x, problem.y), batch_size=250))
    data = load_cnn_data()
    cnn = train_cnn("cnn", data).double().eval()
    loader = DataLoader(TensorDataset(data["x"].double(), data["y"]), batch_size=250)
    result["digits CNN"] = (cnn, loader)
    return result


def hutchinson_row(name: str, net: torch.nn.Module, loader: DataLoader) -> List[str]:
    model = CgInfluence(net, torch.nn.functional.cross_entropy, "auto").fit(loader)
    lam = model.regularization_by_block["model"]
    assert lam is not None
    return [
        name, str(model.n_parameters), "Hessian (Hutchinson)", f"{lam:.3g}", f"{lam:.3g}",
        "", "", "",
    ]  # fmt: skip


def dense_row(name: str, net: torch.nn.Module, loader: DataLoader) -> List[List[str]]:
    rows = []
    for label, mode in MODES:
        if name == "digits CNN" and mode is SecondOrderMode.HESSIAN:
            rows.append(hutchinson_row(name, net, loader))
            continue
        model = DirectInfluence(
            net, torch.nn.functional.cross_entropy, "auto", second_order_mode=mode,
            on_nonconvergence="warn",
        ).fit(loader)  # fmt: skip
        op = model.block_mapper.composable_block_dict["model"].op
        lam = model.regularization_by_block["model"]
        assert lam is not None
        size = op.input_size
        curvature = op.matrix - lam * torch.eye(size, dtype=torch.float64)
        eigenvalues = torch.linalg.eigvalsh(curvature)
        mean = float(torch.trace(curvature)) / size
        kappa = model.solver_diagnostics["model"].condition_number
        rows.append(
            [
                name, str(size), label, f"{lam:.3g}", f"{mean:.3g}",
                f"{float(eigenvalues[0]):.3g}", f"{float(eigenvalues[-1]):.3g}", f"{kappa:.3g}",
            ]
        )  # fmt: skip
    return rows


def ekfac_row(name: str, net: torch.nn.Module, loader: DataLoader) -> List[str]:
    model = EkfacInfluence(net, True, loss=torch.nn.functional.cross_entropy).fit(loader)
    chosen = ", ".join(
        f"{layer}: {value:.3g}" for layer, value in model.regularization_by_block.items()
    )
    return [name, str(model.n_parameters), "EK-FAC (per layer)", chosen, "", "", "", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="update benchmarks/README.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start, cpu = time.perf_counter(), time.process_time()
    rows: List[List[str]] = []
    for name, (net, loader) in models().items():
        rows += dense_row(name, net, loader)
        if name != "digits logistic regression":
            rows.append(ekfac_row(name, net, loader))
        logging.getLogger(__name__).warning("%s done at %.0f s", name, time.perf_counter() - start)
    header = ["model", "P", "curvature", "auto λ", "tr(C)/P", "μ_min", "μ_max", "κ(C + λI)"]
    table = markdown_table(header, rows)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    text = (
        f"{table}\n\n{machine_note()}; {elapsed:.0f} s in all, {cpu:.0f} s of CPU time "
        "(shared machine)."
    )
    print(text)
    if args.readme:
        replace_readme_section("auto_regularization", text)


if __name__ == "__main__":
    main()
