"""Per-sample gradients of a tiny BERT: influx against a Python loop of `torch.autograd.grad`.

The model and data are those of `examples/text_classification.py` (1 layer, hidden size 16,
2 heads, vocabulary of 50, float64, padded sequences of at most 12 tokens), 256 samples, all
trainable parameters but the embeddings. Three ways to the `(256, P)` matrix of per-sample
gradients, timed in the same run at one torch thread (median of `--repeats` runs after one
warm-up):

- `loop`: for each sample, `model(**x_i).logits`, the cross-entropy and `torch.autograd.grad`;
- `influx (4-D mask)`: `TorchGradientProvider.flat_grads` with the example's task, which hands
  the model a 4-D additive attention mask: one `vmap` call over the batch;
- `influx (2-D mask)`: the same with `F.cross_entropy` on the 2-D padding mask, on which the
  model branches (`mask.all()`), so influx falls back to one forward pass per chunk of samples
  and vectorised backward passes.

The three results are checked to agree (float64, 1e-10). Needs `transformers`.
Run: `PYTHONPATH=src python benchmarks/per_sample_grads_bert.py [--readme]`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch.nn.functional as F

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import text_classification as tc  # noqa: E402

from influx.torch import TorchBatch, TorchGradientProvider  # noqa: E402

logger = logging.getLogger("per_sample_grads_bert")

N_SAMPLES = 256
MARKER = "<!-- per-sample-grads-bert -->"


def loop_gradients(
    net: torch.nn.Module, x: Dict[str, torch.Tensor], y: torch.Tensor
) -> torch.Tensor:
    """The reference: one forward and backward pass per sample."""
    params = [p for p in net.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        outputs = net(
            input_ids=x["input_ids"][i : i + 1], attention_mask=x["attention_mask"][i : i + 1]
        )
        grads = torch.autograd.grad(F.cross_entropy(outputs.logits, y[i : i + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def timed(function: Callable[[], torch.Tensor], repeats: int) -> "tuple[float, torch.Tensor]":
    result = function()  # warm-up
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(repeats: int = 5, readme: bool = False) -> Dict[str, float]:
    torch.set_num_threads(1)
    x, y, _ = tc.token_data(N_SAMPLES, seed=0)
    net = tc.tiny_bert(seed=0)
    for name, parameter in net.named_parameters():
        if "embeddings" in name:
            parameter.requires_grad_(False)
    batch = TorchBatch(x, y)
    vectorised = TorchGradientProvider(net, tc.SequenceClassification())
    looping = TorchGradientProvider(net, F.cross_entropy)
    times: Dict[str, float] = {}
    times["loop"], reference = timed(lambda: loop_gradients(net, x, y), repeats)
    times["influx (4-D mask)"], fast = timed(lambda: vectorised.flat_grads(batch), repeats)
    times["influx (2-D mask)"], slow = timed(lambda: looping.flat_grads(batch), repeats)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(slow, reference, rtol=1e-10, atol=1e-12)
    n_params = reference.shape[1]
    lines = [
        MARKER,
        f"Tiny BERT, {n_params} trainable parameters, {N_SAMPLES} samples, float64, 1 thread, "
        f"median of {repeats} runs:",
        "",
        "| per-sample gradients | time | speed-up over the loop |",
        "| --- | --- | --- |",
    ]
    for name, seconds in times.items():
        lines.append(f"| {name} | {1000 * seconds:.0f} ms | {times['loop'] / seconds:.1f}x |")
    table = "\n".join(lines) + "\n"
    print(table)
    if readme:
        path = ROOT / "benchmarks" / "README.md"
        text = path.read_text()
        start = text.index(MARKER)
        last_row = text.find("| influx (2-D mask)", start)
        end = start + len(MARKER) + 1 if last_row < 0 else text.index("\n", last_row) + 1
        path.write_text(text[:start] + table + text[end:])
    return {name: times["loop"] / seconds for name, seconds in times.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--readme", action="store_true", help="update benchmarks/README.md")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    main(arguments.repeats, arguments.readme)
