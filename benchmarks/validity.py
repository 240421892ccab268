"""Validity benchmark: the LDS of every influence method on three digits workloads.

Workloads (sklearn's digits, 8x8 images scaled to [0, 1], a fixed permutation: the first
1,000 points train, the next 200 test): an L2 logistic regression (650 parameters), a
64-32-10 tanh MLP (2,410) and a small CNN (conv 1->4 3x3, tanh, conv 4->8 3x3, tanh,
linear 128->10; 1,626 parameters). Every model is trained by full-batch L-BFGS (300
iterations, strong Wolfe) on the mean cross-entropy plus a weight decay mu |theta|^2,
mu = 1e-3, from a seeded initialisation.

Protocol: the ground truth is `retrain_on_subsets` (M random half-subsets, subset seed 0),
each subset retrained from every training seed and the test cross-entropies averaged over
the seeds; it is kept in a zarr store in --out and resumed on a rerun. The influence is
computed on the model trained on all 1,000 points with seed 0 (an ensemble of k members
uses the models of seeds 0..k-1), with the loss `cross_entropy` (the weight decay is not
part of it: lambda stands for it and for the damping), for lambda in a grid 1e-5 ... 1 in
decades and "auto". Every score matrix is cached as .npy in --out with its time, so a rerun
only computes what is missing; `--table` prints the markdown tables of what is there.

    PYTHONPATH=src python benchmarks/validity.py --quick          # smoke run, minutes
    nice -n 5 env PYTHONPATH=src python benchmarks/validity.py --out validity-out
    PYTHONPATH=src python benchmarks/validity.py --out validity-out --table

`--export` writes, per workload, the data, the weights of the seed-0 model and the ground
truth as .npy for `benchmarks/validity_dattri.py` (run in dattri's own environment).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import torch
from influx.evaluation import RetrainingResult, retrain_on_subsets
from influx.torch import (
    ArnoldiInfluence,
    BlockMode,
    CgInfluence,
    DirectInfluence,
    EkfacInfluence,
    EnsembleInfluence,
    InverseHarmonicMeanInfluence,
    LissaInfluence,
    NystroemSketchInfluence,
    ProjectedInfluence,
    SecondOrderMode,
)

logger = logging.getLogger("validity")

DECAY = 1e-3
GRID: Tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
WORKLOADS = ("logreg", "mlp", "cnn")
MODES = {
    "H": SecondOrderMode.HESSIAN,
    "GN": SecondOrderMode.GAUSS_NEWTON,
    "GGN": SecondOrderMode.GENERALIZED_GAUSS_NEWTON,
}
Lam = Any  # a float or "auto"


class Digits:
    """The data of one workload, its model factory, `train` and `measure` (picklable)."""

    def __init__(self, kind: str, n_train: int = 1000, n_test: int = 200):
        x, y = load_digits(return_X_y=True)
        perm = np.random.default_rng(0).permutation(len(x))
        self.kind = kind
        train, test = perm[:n_train], perm[n_train : n_train + n_test]
        self.x = self._inputs(x[train])
        self.y = torch.tensor(y[train])
        self.x_test = self._inputs(x[test])
        self.y_test = torch.tensor(y[test])

    def _inputs(self, x: np.ndarray) -> torch.Tensor:
        values = torch.tensor(x / 16.0, dtype=torch.float64)
        return values.reshape(-1, 1, 8, 8) if self.kind == "cnn" else values

    def make(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        nn = torch.nn
        net: torch.nn.Module
        if self.kind == "logreg":
            net = nn.Linear(64, 10)
        elif self.kind == "mlp":
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

    def train(self, indices: np.ndarray, seed: int) -> torch.nn.Module:
        net = self.make(seed)
        x, y = self.x[indices], self.y[indices]
        optimizer = torch.optim.LBFGS(
            net.parameters(),
            max_iter=300,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            value = torch.nn.functional.cross_entropy(net(x), y) + DECAY * sum(
                (p**2).sum() for p in net.parameters()
            )
            value.backward()
            return value

        optimizer.step(closure)
        return net

    def measure(self, net: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            losses = torch.nn.functional.cross_entropy(
                net(self.x_test), self.y_test, reduction="none"
            )
        return losses.numpy()

    def loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=250)


@dataclass
class Settings:
    out: Path
    subsets: int
    seeds: Dict[str, int]
    members: Tuple[int, ...]
    n_train: int
    n_test: Dict[str, int]
    grid: Tuple[float, ...]
    rank: int
    lissa_iterations: int
    min_subsets: int
    projection_dim: int
    ensembles: Tuple[str, ...] = ("ekfac", "direct-H")

    def problem(self, kind: str) -> Digits:
        return Digits(kind, self.n_train, self.n_test[kind])


# --------------------------------------------------------------------------------------------
# Ground truth and trained models (cached)
# --------------------------------------------------------------------------------------------


def seed_store(settings: Settings, kind: str, seed: int) -> Path:
    return settings.out / f"truth-{kind}-{settings.subsets}-seed{seed}.zarr"


def retrain_seed(settings: Settings, kind: str, seed: int) -> RetrainingResult:
    """The retrainings of `kind` with one training seed, from (or into) its zarr store.

    One store per seed (same subsets: subset seed 0) lets a partial run use the seeds that
    are complete and lets later seeds be added without redoing the first ones."""
    problem = settings.problem(kind)
    store = seed_store(settings, kind, seed)
    start = time.perf_counter()
    result = retrain_on_subsets(
        problem.train,
        problem.measure,
        len(problem.x),
        n_subsets=settings.subsets,
        seeds=(seed,),
        store=store,
        progress=False,
    )
    logger.info("%s: retrainings of seed %d in %.0f s", kind, seed, time.perf_counter() - start)
    return result


def ground_truth(settings: Settings, kind: str, partial: bool = False) -> RetrainingResult:
    """The ground truth of `kind`: the test losses averaged over the training seeds.

    Without `partial`, every seed of the settings is retrained (resuming from its store).
    With `partial`, nothing is retrained: the stores are read as they are, and the truth uses
    the first seeds 0..s-1 that share at least `settings.min_subsets` completed subsets (the
    most seeds possible), on those subsets only. The subsets are drawn at random, so the
    completed ones are a random sample of them: a partial ground truth has fewer subsets
    (and seeds), not a biased one."""
    if not partial:
        results = [retrain_seed(settings, kind, seed) for seed in range(settings.seeds[kind])]
        per_seed = np.concatenate([r.per_seed_outputs for r in results])
        return RetrainingResult(
            subsets=results[0].subsets,
            outputs=per_seed.mean(axis=0),
            per_seed_outputs=per_seed,
            seeds=tuple(range(len(results))),
        )
    import zarr

    masks, outputs = [], []
    subsets = None
    for seed in range(settings.seeds[kind]):
        path = seed_store(settings, kind, seed)
        if not path.exists():
            break
        group = zarr.open_group(str(path), mode="r")
        done = np.asarray(group["done"][0]) if "outputs" in group else None
        if done is None or not done.any():
            break
        common = done if not masks else masks[-1] & done
        if common.sum() < min(settings.min_subsets, settings.subsets):
            break
        subsets = np.asarray(group["subsets"][:])
        masks.append(common)
        outputs.append(np.asarray(group["outputs"][0]))
    if not masks:
        raise RuntimeError(f"no ground truth for {kind} in {settings.out} yet")
    used = masks[-1]
    per_seed = np.stack([o[used] for o in outputs])
    assert subsets is not None
    return RetrainingResult(
        subsets=subsets[used],
        outputs=per_seed.mean(axis=0),
        per_seed_outputs=per_seed,
        seeds=tuple(range(len(outputs))),
    )


def trained(settings: Settings, problem: Digits, seed: int) -> torch.nn.Module:
    """The model of `seed` trained on all training points (its weights cached)."""
    path = settings.out / "models" / f"{problem.kind}-seed{seed}.pt"
    net = problem.make(seed)
    if path.exists():
        net.load_state_dict(torch.load(path))
        return net
    net = problem.train(np.arange(len(problem.x)), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------

CE = torch.nn.functional.cross_entropy
Builder = Callable[[torch.nn.Module, Lam, Settings], Any]


def _direct(mode: str) -> Builder:
    return lambda net, lam, s: DirectInfluence(
        net, CE, regularization=lam, second_order_mode=MODES[mode]
    )


def _cg(mode: str) -> Builder:
    return lambda net, lam, s: CgInfluence(
        net,
        CE,
        regularization=lam,
        second_order_mode=MODES[mode],
        rtol=1e-8,
        maxiter=500,
        solve_simultaneously=True,
        on_nonconvergence="warn",
    )


def _lissa(net: torch.nn.Module, lam: Lam, s: Settings) -> Any:
    return LissaInfluence(
        net,
        CE,
        regularization=lam,
        maxiter=s.lissa_iterations,
        scale="auto",
        on_nonconvergence="warn",
        warn_on_max_iteration=False,
        seed=0,
    )


def _arnoldi(net: torch.nn.Module, lam: Lam, s: Settings) -> Any:
    return ArnoldiInfluence(net, CE, regularization=lam, rank=s.rank, seed=0)


def _nystroem(net: torch.nn.Module, lam: Lam, s: Settings) -> Any:
    return NystroemSketchInfluence(net, CE, regularization=lam, rank=s.rank, seed=0)


def _ihm(net: torch.nn.Module, lam: Lam, s: Settings) -> Any:
    return InverseHarmonicMeanInfluence(
        net, CE, regularization=lam, block_structure=BlockMode.LAYER_WISE
    )


def _kfac(update: bool) -> Builder:
    return lambda net, lam, s: EkfacInfluence(
        net, update_diagonal=update, hessian_regularization=lam, loss=CE
    )


def _projected(net: torch.nn.Module, lam: Lam, s: Settings) -> Any:
    return ProjectedInfluence(net, CE, projection_dim=s.projection_dim, regularization=lam, seed=0)


#: name -> (builder, the curvature it inverts)
METHODS: Dict[str, Tuple[Builder, str]] = {
    "direct-H": (_direct("H"), "Hessian"),
    "direct-GN": (_direct("GN"), "GN (empirical Fisher)"),
    "direct-GGN": (_direct("GGN"), "GGN"),
    "cg-H": (_cg("H"), "Hessian"),
    "cg-GGN": (_cg("GGN"), "GGN"),
    "lissa-H": (_lissa, "Hessian"),
    "arnoldi-H": (_arnoldi, "Hessian"),
    "nystroem-H": (_nystroem, "Hessian"),
    "ihm-GN": (_ihm, "GN, layer-wise"),
    "ekfac": (_kfac(True), "EK-FAC (empirical Fisher)"),
    "kfac": (_kfac(False), "K-FAC (empirical Fisher)"),
    "projected-GN": (_projected, "GN, projected"),
}
#: methods evaluated on the whole lambda grid (the others at "auto" and the best Direct lambda)
GRID_METHODS = ("direct-H", "direct-GN", "direct-GGN", "ekfac", "kfac")
#: methods that dattri implements too (see validity_dattri.py), compared at the same lambda
DATTRI_METHODS = ("direct-H", "cg-H", "arnoldi-H", "ihm-GN", "ekfac")


def lam_key(lam: Lam) -> str:
    return "auto" if lam == "auto" else f"{lam:g}"


def fitted_lam(model: Any) -> float:
    """The lambda a fitted model uses (the mean over blocks of a layer-wise one)."""
    values = [v for v in model.regularization_by_block.values() if v is not None]
    return float(np.mean(values)) if values else 0.0


class Runner:
    """Computes (or loads) score matrices and records their time; the LDS of each is computed
    against the ground truth of the complete seeds when asked (`lds`), so that scores computed
    while the retrainings run are scored against the final ground truth."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.results_path = settings.out / "results.jsonl"
        self.truths: Dict[str, RetrainingResult] = {}
        self.done = {self.key(row) for row in self.rows()}

    @staticmethod
    def key(row: Dict[str, Any]) -> Tuple[str, str, str, int]:
        return row["workload"], row["method"], row["lam"], row["members"]

    def rows(self) -> List[Dict[str, Any]]:
        if not self.results_path.exists():
            return []
        return [json.loads(line) for line in self.results_path.read_text().splitlines()]

    def truth(self, kind: str) -> RetrainingResult:
        if kind not in self.truths:
            self.truths[kind] = ground_truth(self.settings, kind, partial=True)
        return self.truths[kind]

    def lds(self, row: Dict[str, Any]) -> float:
        """The LDS of a recorded score matrix against the current ground truth."""
        values = np.load(self.scores_path(*self.key(row)))
        return float(self.truth(row["workload"]).lds(values).mean)

    def scores_path(self, kind: str, method: str, lam: str, members: int) -> Path:
        return self.settings.out / "scores" / kind / f"{method}-{lam}-k{members}.npy"

    def evaluate(
        self, problem: Digits, method: str, lams: Sequence[Lam], members: Sequence[int] = (1,)
    ) -> None:
        """Scores of `method` at each lambda and ensemble size; fitted once per member, with
        `with_regularization` for the other lambdas (the time is the fit plus the scores)."""
        kind = problem.kind
        todo = [
            (lam, k)
            for lam in lams
            for k in members
            if (kind, method, lam_key(lam), k) not in self.done
        ]
        if not todo:
            return
        builder = METHODS[method][0]
        loader = problem.loader()
        fitted: List[Tuple[Any, float]] = []
        base: Lam = "auto" if "auto" in lams else lams[0]
        for seed in range(max(k for _, k in todo)):
            net = trained(self.settings, problem, seed)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = builder(net, base, self.settings).fit(loader)
            fitted.append((model, time.perf_counter() - start))
        for lam, k in todo:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                models = [m if lam == base else m.with_regularization(lam) for m, _ in fitted[:k]]
                model = models[0] if k == 1 else EnsembleInfluence(models)
                values = model.influences(
                    problem.x_test, problem.y_test, problem.x, problem.y
                ).numpy()
            seconds = time.perf_counter() - start + sum(t for _, t in fitted[:k])
            path = self.scores_path(kind, method, lam_key(lam), k)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, values)
            row = {
                "workload": kind,
                "method": method,
                "lam": lam_key(lam),
                "members": k,
                "lam_used": float(np.mean([fitted_lam(m) for m in models])),
                "finite": bool(np.isfinite(values).all()),
                "seconds": seconds,
            }
            with self.results_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            self.done.add(self.key(row))
            logger.info(
                "%s %s lam=%s k=%d: lambda used %.3g, %.1f s",
                kind,
                method,
                row["lam"],
                k,
                row["lam_used"],
                seconds,
            )

    def best_lam(self, kind: str, method: str = "direct-H") -> Optional[float]:
        """The lambda of the grid with the highest LDS of `method` (one model)."""
        grid = [
            r
            for r in self.rows()
            if self.key(r)[:2] == (kind, method) and r["members"] == 1 and r["lam"] != "auto"
        ]
        if not grid:
            return None
        return float(max(grid, key=self.lds)["lam"])


def run(settings: Settings, kinds: Sequence[str], methods: Sequence[str]) -> None:
    """Scores of every method: first the methods with a lambda grid and the ensembles (they
    need no ground truth), then, once the ground truth of a workload has a complete seed, the
    other methods at "auto" and at the best Direct lambda."""
    runner = Runner(settings)
    lams: List[Lam] = ["auto", *settings.grid]
    for kind in kinds:
        problem = settings.problem(kind)
        for method in methods:
            if method in GRID_METHODS:
                runner.evaluate(problem, method, lams)
        if kind != "logreg":
            for method in settings.ensembles:
                if method in methods:
                    runner.evaluate(problem, method, lams, settings.members)
    for kind in kinds:
        try:
            best = runner.best_lam(kind)
        except RuntimeError as error:  # no complete seed of the ground truth yet
            logger.info("%s: %s; the methods without a grid are left for a rerun", kind, error)
            continue
        for method in methods:
            if method not in GRID_METHODS:
                runner.evaluate(settings.problem(kind), method, ["auto", best])


# --------------------------------------------------------------------------------------------
# Tables and export
# --------------------------------------------------------------------------------------------


def tables(settings: Settings) -> str:
    runner = Runner(settings)
    kinds = []
    for kind in WORKLOADS:
        try:
            runner.truth(kind)
            kinds.append(kind)
        except RuntimeError as error:  # no usable ground truth yet: left out of the tables
            logger.info("%s", error)
    rows = [r for r in runner.rows() if r["workload"] in kinds]
    for row in rows:
        row["lds"] = runner.lds(row)
    get = {runner.key(r): r for r in rows}
    kinds = [k for k in kinds if any(r["workload"] == k for r in rows)]
    lines: List[str] = [
        "Ground truth: "
        + ", ".join(
            f"{k} {len(runner.truth(k).seeds)} seed(s) x {len(runner.truth(k).subsets)} subsets"
            for k in kinds
        )
    ]

    lines.append("\nBest lambda of the grid against auto (one model):\n")
    lines.extend(summary_table(runner, get, kinds))
    lines.append("\nLDS over the lambda grid (one model):\n")
    head = " | ".join(f"{lam:g}" for lam in settings.grid)
    lines.append(f"| workload | method | {head} | auto (lambda chosen) | auto - best |")
    lines.append("| --- | --- |" + " --- |" * (len(settings.grid) + 2))
    for kind in kinds:
        for method in GRID_METHODS:
            grid = {lam_key(v): get.get((kind, method, lam_key(v), 1)) for v in settings.grid}
            found = {key: r for key, r in grid.items() if r is not None}
            if not found:
                continue
            best = max(found, key=lambda key: found[key]["lds"])
            cells = " | ".join(
                "" if r is None else (f"**{r['lds']:.3f}**" if key == best else f"{r['lds']:.3f}")
                for key, r in grid.items()
            )
            auto = get.get((kind, method, "auto", 1))
            auto_cell = f"{auto['lds']:.3f} ({auto['lam_used']:.2g})" if auto else ""
            gap = f"{auto['lds'] - found[best]['lds']:+.3f}" if auto else ""
            lines.append(f"| {kind} | {method} | {cells} | {auto_cell} | {gap} |")

    lines.append('\nEvery method at "auto" and at the best lambda of direct-H (one model):\n')
    lines.append(
        "| workload | method | curvature | LDS auto (lambda) | time | LDS at lambda | lambda "
        "| time |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in kinds:
        best = runner.best_lam(kind)
        for method, (_, curvature) in METHODS.items():
            auto = get.get((kind, method, "auto", 1))
            fixed = [
                r
                for r in rows
                if runner.key(r)[:2] == (kind, method) and r["members"] == 1 and r["lam"] != "auto"
            ]
            at = [r for r in fixed if best is not None and r["lam"] == lam_key(best)] or fixed[:1]
            a = (
                f"{auto['lds']:.3f} ({auto['lam_used']:.2g}) | {auto['seconds']:.1f} s"
                if auto
                else " | "
            )
            b = f"{at[0]['lds']:.3f} | {at[0]['lam']} | {at[0]['seconds']:.1f} s" if at else " | | "
            lines.append(f"| {kind} | {method} | {curvature} | {a} | {b} |")

    lines.append("\nEnsembles of k models trained from seeds 0..k-1 (LDS):\n")
    sizes = settings.members
    lines.append(
        "| workload | method | lambda | "
        + " | ".join(f"k = {k}" for k in sizes)
        + f" | gain {sizes[-1]} vs 1 |"
    )
    lines.append("| --- | --- | --- |" + " --- |" * (len(sizes) + 1))
    for kind in kinds:
        for method in GRID_METHODS:
            for lam in ["auto", *[lam_key(v) for v in settings.grid]]:
                found = [get.get((kind, method, lam, k)) for k in sizes]
                if sum(r is not None for r in found) < 2:
                    continue
                cells = " | ".join(f"{r['lds']:.3f}" if r else "" for r in found)
                first, last = found[0], found[-1]
                gain = f"{last['lds'] - first['lds']:+.3f}" if first and last else ""
                lines.append(f"| {kind} | {method} | {lam} | {cells} | {gain} |")
    lines.extend(dattri_table(runner, get))
    return "\n".join(lines)


def summary_table(
    runner: Runner, get: Dict[Any, Dict[str, Any]], kinds: Sequence[str]
) -> List[str]:
    """Best lambda of the grid against "auto", per workload and grid method (one model)."""
    lines = [
        "| workload | method | best lambda of the grid: LDS | auto: lambda, LDS | auto - best |",
        "| --- | --- | --- | --- | --- |",
    ]
    for kind in kinds:
        for method in GRID_METHODS:
            grid = [
                get[kind, method, lam_key(v), 1]
                for v in runner.settings.grid
                if (kind, method, lam_key(v), 1) in get
            ]
            auto = get.get((kind, method, "auto", 1))
            if not grid or auto is None:
                continue
            best = max(grid, key=lambda r: r["lds"])
            lines.append(
                f"| {kind} | {method} | {best['lam']}: {best['lds']:.3f} | "
                f"{auto['lam_used']:.2g}, {auto['lds']:.3f} | {auto['lds'] - best['lds']:+.3f} |"
            )
    return lines


def dattri_table(runner: Runner, get: Dict[Any, Dict[str, Any]]) -> List[str]:
    """influx against dattri (validity_dattri.py's scores) on the same ground truth."""
    path = runner.settings.out / "dattri" / "results.jsonl"
    if not path.exists():
        return []
    lines = [
        "\ninflux and dattri 0.3.0, same model, same lambda (LDS, time):\n",
        "| workload | method | lambda | influx | dattri | influx time | dattri time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    latest = {}
    for line in path.read_text().splitlines():  # the last run of each (workload, method, lambda)
        row = json.loads(line)
        latest[row["workload"], row["method"], row["lam"]] = row
    order = {kind: i for i, kind in enumerate(WORKLOADS)}
    for (kind, method, lam), row in sorted(
        latest.items(), key=lambda item: (order[item[0][0]], item[0][1], float(item[0][2]))
    ):
        ours = get.get((kind, method, lam, 1))
        ours_cells = f"{ours['lds']:.3f}" if ours else ""
        ours_time = f"{ours['seconds']:.1f} s" if ours else ""
        if "error" in row:
            theirs = f"fails: {row['error'][:80]}"
        else:
            values = np.load(path.parent / kind / f"{method}-{lam}.npy")
            finite = np.isfinite(values).all()
            theirs = f"{runner.truth(kind).lds(values).mean:.3f}" if finite else "not finite"
            if row.get("dtype") == "float32":
                theirs += " (float32)"
        lines.append(
            f"| {kind} | {method} | {lam} | {ours_cells} | {theirs} | {ours_time} "
            f"| {row['seconds']:.1f} s |"
        )
    return lines


def damping_scan(settings: Settings, kinds: Sequence[str]) -> None:
    """The Hessian spectrum of the seed-0 model and the LDS of direct-H on a finer lambda grid
    (quarter decades) and at candidate rules for choosing lambda, in `damping-scan.jsonl`."""
    runner = Runner(settings)
    for kind in kinds:
        problem = settings.problem(kind)
        truth = runner.truth(kind)
        net = trained(settings, problem, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = DirectInfluence(net, CE, regularization="auto").fit(problem.loader())
        hessian = model.block_mapper.composable_block_dict["model"].op._base
        eig = torch.linalg.eigvalsh(hessian)
        mean, rms = float(eig.mean()), float(eig.pow(2).mean().sqrt())
        negative = float(max(-eig.min(), 0.0))
        candidates = {
            "auto (0.1 mean)": 0.1 * mean,
            "mean": mean,
            "0.1 rms": 0.1 * rms,
            "0.1 mean + |min|": 0.1 * mean + negative,
            "max(0.1 mean, 2 |min|)": max(0.1 * mean, 2 * negative),
        }
        fine = [10.0 ** (e / 4) for e in range(-20, 1)]
        scan = {}
        for lam in fine + list(candidates.values()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                values = model.with_regularization(lam).influences(
                    problem.x_test, problem.y_test, problem.x, problem.y
                )
            scan[lam] = float(truth.lds(values.numpy()).mean)
        row = {
            "workload": kind,
            "eig_min": float(eig.min()),
            "eig_mean": mean,
            "eig_rms": rms,
            "eig_max": float(eig.max()),
            "n_negative": int((eig < 0).sum()),
            "fine": [[lam, scan[lam]] for lam in fine],
            "candidates": {name: [lam, scan[lam]] for name, lam in candidates.items()},
            "subsets": len(truth.subsets),
            "seeds": len(truth.seeds),
        }
        with (settings.out / "damping-scan.jsonl").open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        best = max(fine, key=lambda lam: scan[lam])
        logger.info(
            "%s: spectrum min %.3g mean %.3g rms %.3g max %.3g (%d negative); "
            "best quarter-decade lambda %.3g: LDS %.3f; %s",
            kind,
            eig.min(),
            mean,
            rms,
            eig.max(),
            row["n_negative"],
            best,
            scan[best],
            {n: (round(v[0], 6), round(v[1], 3)) for n, v in row["candidates"].items()},
        )


def export(settings: Settings, kinds: Sequence[str]) -> None:
    """Data, seed-0 weights (flat, in `parameters()` order), ground truth and the influx
    scores' lambdas, as .npy in `out/export/<kind>/` for validity_dattri.py."""
    runner = Runner(settings)
    for kind in kinds:
        problem = settings.problem(kind)
        truth = runner.truth(kind)
        folder = settings.out / "export" / kind
        folder.mkdir(parents=True, exist_ok=True)
        net = trained(settings, problem, 0)
        flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        arrays = {
            "x_train": problem.x.numpy(),
            "y_train": problem.y.numpy(),
            "x_test": problem.x_test.numpy(),
            "y_test": problem.y_test.numpy(),
            "weights": flat.numpy(),
            "subsets": truth.subsets,
            "outputs": truth.outputs,
        }
        for name, value in arrays.items():
            np.save(folder / f"{name}.npy", value)
        # the lambda at which `run` computes each method: the best of its own grid, else
        # the best of direct-H
        lams = {
            method: runner.best_lam(kind, method if method in GRID_METHODS else "direct-H")
            for method in DATTRI_METHODS
        }
        (folder / "settings.json").write_text(json.dumps({"kind": kind, "lams": lams}))
        logger.info("%s: exported to %s", kind, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("validity-out"))
    parser.add_argument("--quick", action="store_true", help="a smoke run on small sizes")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per subset")
    parser.add_argument(
        "--logreg-seeds", type=int, default=1, help="seeds per subset for the (convex) logreg"
    )
    parser.add_argument("--cnn-test", type=int, default=200, help="test points of the CNN")
    parser.add_argument(
        "--min-subsets",
        type=int,
        default=50,
        help="tables: the fewest completed subsets a partial ground truth may use",
    )
    parser.add_argument(
        "--ensembles",
        nargs="*",
        default=["ekfac", "direct-H"],
        choices=GRID_METHODS,
        help="the methods whose ensembles are computed (MLP and CNN)",
    )
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--truth-only", action="store_true", help="only the ground truth")
    parser.add_argument("--table", action="store_true", help="print the tables and exit")
    parser.add_argument(
        "--damping-scan", action="store_true", help="direct-H on a finer lambda grid"
    )
    parser.add_argument("--export", action="store_true", help="export for validity_dattri.py")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    if args.quick:
        settings = Settings(
            out=args.out / "quick" if args.out.name != "quick" else args.out,
            subsets=8,
            seeds={"logreg": 1, "mlp": 2, "cnn": 2},
            members=(1, 2),
            n_train=200,
            n_test={"logreg": 20, "mlp": 20, "cnn": 20},
            grid=(1e-3, 1e-1),
            rank=5,
            lissa_iterations=20,
            min_subsets=8,
            projection_dim=32,
        )
    else:
        settings = Settings(
            out=args.out,
            subsets=args.subsets,
            seeds={"logreg": args.logreg_seeds, "mlp": args.seeds, "cnn": args.seeds},
            members=tuple(args.members),
            n_train=1000,
            n_test={"logreg": 200, "mlp": 200, "cnn": args.cnn_test},
            grid=GRID,
            rank=50,
            lissa_iterations=200,
            min_subsets=args.min_subsets,
            ensembles=tuple(args.ensembles),
            projection_dim=256,
        )
    settings.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        print(tables(settings))
        return
    if args.damping_scan:
        damping_scan(settings, args.workloads)
        return
    if args.export:
        export(settings, args.workloads)
        return
    if args.truth_only:
        for seed in range(max(settings.seeds.values())):
            for kind in args.workloads:
                if seed < settings.seeds[kind]:
                    retrain_seed(settings, kind, seed)
        return
    run(settings, args.workloads, args.methods)
    print(tables(settings))


if __name__ == "__main__":
    main()
