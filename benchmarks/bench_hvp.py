"""Per-call cost of Hessian-vector products and per-sample gradients against the floor.

For three model sizes (a logistic regression with 31 parameters, the digits MLP 64-32-10
with 2,410 and the MLP 64-300-256-10 with 99,126; weights drawn at random, which does not
change the cost) and one batch of 256 points, the script times, per call, in float32 at the
current torch thread count:

* influx's Hessian-vector product of `K` vectors reverse-over-reverse
  (`create_batch_hvp_reverse_function`, one backward pass per vector and the passes batched
  with `is_grads_batched`), forward-over-reverse vectorised over the vectors
  (`create_batch_hvp_function` with `reverse_max_rows=0`) and the default choice;
* the *floor*: the same products written directly with `torch.func` on the module
  (`vmap` of `jvp` of `grad` of `functional_call`) and, for one vector, with
  `torch.autograd.grad` twice on the module itself;
* per-sample gradients of the batch, influx's against `vmap(grad(...))` written directly.

Medians over repeated calls (the machine may be shared: compare within one run).

Usage (from the repository root):

    PYTHONPATH=src .venv/bin/python benchmarks/bench_hvp.py [--threads 1] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from typing import Callable, Dict, List

from torch.func import functional_call, grad, jvp, vmap

import torch
from influx.torch.functional import (
    HVP_REVERSE_MAX_ROWS,
    HVP_REVERSE_VECTORISED_MAX_PARAMETERS,
    create_batch_hvp_function,
    create_batch_hvp_reverse_function,
    create_per_sample_gradient_function,
    get_model_parameters,
    unflatten,
)

BATCH = 256
ROWS = (1, 2, 4, 8, 16, 32, 64)


def models() -> Dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "logreg (31)": torch.nn.Sequential(torch.nn.Linear(30, 1), torch.nn.Flatten(0)),
        "digits MLP (2,410)": torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
        ),
        "MLP (99,126)": torch.nn.Sequential(
            torch.nn.Linear(64, 300),
            torch.nn.Tanh(),
            torch.nn.Linear(300, 256),
            torch.nn.Tanh(),
            torch.nn.Linear(256, 10),
        ),
    }


def median_time(function: Callable[[], object], repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(label: str, model: torch.nn.Module, repeats: int) -> List[str]:
    """The table rows of one model."""
    lines: List[str] = []
    binary = label.startswith("logreg")
    loss = (
        torch.nn.functional.binary_cross_entropy_with_logits
        if binary
        else torch.nn.functional.cross_entropy
    )
    x = torch.randn(BATCH, 30 if binary else 64)
    y = torch.randint(0, 2, (BATCH,)).float() if binary else torch.randint(0, 10, (BATCH,))
    params = get_model_parameters(model)
    size = sum(p.numel() for p in params.values())
    reverse = create_batch_hvp_reverse_function(model, loss, params, vectorise_rows=False)
    batched = create_batch_hvp_reverse_function(model, loss, params, vectorise_rows=True)
    forward = create_batch_hvp_function(
        model, loss, params, reverse_max_rows=0, vectorised_reverse_max_parameters=0
    )
    vectorised = create_batch_hvp_function(
        model, loss, params, reverse_max_rows=0, vectorised_reverse_max_parameters=size
    )
    default = create_batch_hvp_function(model, loss, params)

    def floor_loss(p: Dict[str, torch.Tensor]) -> torch.Tensor:
        return loss(functional_call(model, p, (x,)), y)

    def floor_one(p: Dict[str, torch.Tensor], v: torch.Tensor) -> Dict[str, torch.Tensor]:
        return jvp(grad(floor_loss), (p,), (unflatten(v, p),))[1]  # type: ignore[no-any-return]

    floor = vmap(floor_one, in_dims=(None, 0))

    def floor_autograd(v: torch.Tensor) -> List[torch.Tensor]:
        leaves = list(model.parameters())
        first = torch.autograd.grad(loss(model(x), y), leaves, create_graph=True)
        parts = torch.split(v, [leaf.numel() for leaf in leaves])
        directions = [d.view_as(leaf) for d, leaf in zip(parts, leaves)]
        return list(torch.autograd.grad(first, leaves, directions))

    for rows in ROWS:
        vs = torch.randn(rows, size)
        cells = [
            median_time(partial(reverse, params, x, y, vs), repeats),
            median_time(partial(batched, params, x, y, vs), repeats),
            median_time(partial(forward, params, x, y, vs), repeats),
            median_time(partial(vectorised, params, x, y, vs), repeats),
            median_time(partial(default, params, x, y, vs), repeats),
            median_time(partial(floor, params, vs), repeats),
        ]
        one = (
            f"{1e3 * median_time(partial(floor_autograd, vs[0]), repeats):.2f}" if rows == 1 else ""
        )
        text = " | ".join(f"{1e3 * c:.2f}" for c in cells)
        lines.append(f"| {label} | {rows} | {text} | {one} |")
    per_sample = create_per_sample_gradient_function(model, loss, params)

    def floor_single(p: Dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
        return loss(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    floor_grads = vmap(grad(floor_single), in_dims=(None, 0, 0))
    ours = median_time(lambda: per_sample(params, x, y), repeats)
    base = median_time(lambda: floor_grads(params, x, y), repeats)
    lines.append(
        f"| {label} | per-sample gradients | influx {1e3 * ours:.2f} | | | | {1e3 * base:.2f} | |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines: List[str] = [
        f"torch {torch.__version__}, {args.threads} thread(s), float32, batch {BATCH}; "
        f"milliseconds per call (median of {args.repeats}); the default takes the "
        f"`torch.autograd` product up to {HVP_REVERSE_MAX_ROWS} vectors, batched up to "
        f"{HVP_REVERSE_VECTORISED_MAX_PARAMETERS} parameters.",
        "",
        "| model | K | reverse-over-reverse, one pass per vector | reverse-over-reverse, "
        "batched passes | forward-over-reverse | reverse-over-reverse, vmap "
        "| default | floor: torch.func "
        "| floor: autograd (K=1) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, model in models().items():
        lines.extend(measure(label, model, args.repeats))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
