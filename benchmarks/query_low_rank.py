"""Query batching: how much accuracy low-rank test factors of EK-FAC keep on a small GPT-2.

A GPT-2 built from a config (2 layers, hidden 32, 4 heads, vocabulary 32) is trained here on
sequences of a random first-order Markov chain (each token has 3 likely successors), then
EK-FAC is fitted on its `Conv1D` layers. For 20 query sequences the test factors of every
layer are approximated at a fixed rank or at the smallest rank meeting a relative Frobenius
error budget (`influx.torch.low_rank_query_factors`), and the influences on 200 training
sequences compared with those of the exact factors: the Pearson correlation of each query's
scores (mean over queries), the overlap of each query's top-10 training sequences (mean), the
largest relative error of the matrix, and the numbers the factors keep, $\\sum_l r_l (m_l +
k_l)$ per query, against $\\sum_l m_l k_l$ for the exact ones. Accuracy only: no timing.

Usage (from the repository root):

    PYTHONPATH=src .venv/bin/python benchmarks/query_low_rank.py
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from influx.torch import CausalLMTask, EkfacInfluence, low_rank_query_factors
from influx.torch.kfac.layers import is_conv1d

logger = logging.getLogger(__name__)

VOCAB, T, N_TRAIN, N_TEST = 32, 16, 200, 20


def markov_corpus(n: int, seed: int) -> torch.Tensor:
    """`n` sequences of `T` tokens of a fixed random Markov chain (3 likely successors)."""
    g = torch.Generator().manual_seed(0)
    successors = torch.randint(0, VOCAB, (VOCAB, 3), generator=g)
    g.manual_seed(seed)
    ids = torch.empty(n, T, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, T):
        choice = torch.randint(0, 3, (n,), generator=g)
        noise = torch.rand(n, generator=g) < 0.1
        ids[:, t] = torch.where(
            noise, torch.randint(0, VOCAB, (n,), generator=g), successors[ids[:, t - 1], choice]
        )
    return ids


def trained_gpt2(ids: torch.Tensor, steps: int = 200) -> torch.nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=T, n_embd=32, n_layer=2, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(config)  # trained in float32, scored in float64
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        batch = ids[torch.randint(0, len(ids), (16,), generator=g)]
        loss = net(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            logger.info("step %d: loss %.3f", step, loss.item())
    return net.double().eval()


def compare(exact: torch.Tensor, approx: torch.Tensor, k: int = 10) -> Tuple[float, float, float]:
    """Mean Pearson per query, mean top-k overlap per query, largest relative error."""
    centred = [m - m.mean(dim=1, keepdim=True) for m in (exact, approx)]
    pearson = (centred[0] * centred[1]).sum(1) / (centred[0].norm(dim=1) * centred[1].norm(dim=1))
    top = [m.topk(k, dim=1).indices for m in (exact, approx)]
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(*top)]
    error = ((approx - exact).abs().max() / exact.abs().max()).item()
    return pearson.mean().item(), sum(overlap) / len(overlap), error


def main() -> List[Dict[str, Any]]:
    ids = markov_corpus(N_TRAIN, 1)
    queries = markov_corpus(N_TEST, 2)
    net = trained_gpt2(ids)
    layers = [name for name, module in net.named_modules() if is_conv1d(module)]
    for name, parameter in net.named_parameters():
        parameter.requires_grad_(any(name.startswith(layer) for layer in layers))
    model = EkfacInfluence(net, True, loss=CausalLMTask(), regularization=0.01, layers=layers)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.fit(
        [({k: v[i : i + 50] for k, v in x.items()}, ids[i : i + 50]) for i in range(0, N_TRAIN, 50)]
    )
    x_test = {"input_ids": queries, "attention_mask": torch.ones_like(queries)}
    factors = model.influence_factors(x_test, queries)
    exact = model.influences_from_factors(factors, x, ids)
    dims = {
        name: (spec.out_dim, spec.input_factor_dim)
        for name, spec in model.block_mapper.layers.items()
    }
    full = sum(m * k for m, k in dims.values())
    rows = []
    settings: List[Tuple[Optional[int], Optional[float]]] = [(r, None) for r in (1, 2, 4, 8, 16)]
    settings += [(None, e) for e in (0.5, 0.3, 0.1)]
    for rank, error in settings:
        approx, ranks = low_rank_query_factors(model, factors, rank=rank, error=error)
        pearson, overlap, max_error = compare(exact, model.influences_from_factors(approx, x, ids))
        kept = sum(r * sum(dims[name]) for name, r in ranks.items())
        rows.append(
            {
                "setting": f"rank {rank}" if rank is not None else f"error {error}",
                "ranks": "/".join(str(r) for r in ranks.values()),
                "pearson": pearson,
                "top10": overlap,
                "max_rel_error": max_error,
                "numbers": kept / full,
            }
        )
    print(
        "| setting | ranks per layer | Pearson | top-10 overlap | max. rel. error | numbers kept |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['setting']} | {row['ranks']} | {row['pearson']:.4f} | {row['top10']:.2f} "
            f"| {row['max_rel_error']:.2e} | {row['numbers']:.1%} |"
        )
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
