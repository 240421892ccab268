"""Which training tokens taught this completion? Planted facts in a tiny GPT-2.

A synthetic corpus: sequences of filler tokens, some of which state a fact "subject relation
object" (each fact in a few training sequences, at a random place). A tiny GPT-2 (built from
a config, nothing downloaded) learns the facts; each query prompts with a subject and the
relation and is measured on the object only (a completion mask). EK-FAC on GPT-2's `Conv1D`
layers with a `CausalLMTask` ranks the training sequences for each query (recall of the
planted sequences among the top 10) and, per token, shows where the influence sits inside a
planted sequence (`per_token="train"`): the fraction of planted sequences whose top-scored
token is one of the fact's three tokens.

Needs `transformers` (`pip install influx[hf]`). Run: `python examples/lm_per_token.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

import torch
from influx.torch import CausalLMTask, EkfacInfluence
from influx.torch.kfac.layers import is_conv1d

logger = logging.getLogger("lm_per_token")

N_FACTS, N_FILLER, T = 8, 4, 10
RELATION = 0
SUBJECTS = list(range(1, 1 + N_FACTS))
OBJECTS = list(range(1 + N_FACTS, 1 + 2 * N_FACTS))
FILLER = list(range(1 + 2 * N_FACTS, 1 + 2 * N_FACTS + N_FILLER))
VOCAB = 1 + 2 * N_FACTS + N_FILLER


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """GPT-2 with 1 layer, hidden size 32, 2 heads, eager attention, float64."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=T,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        loss_type="ForCausalLM",
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).double()


def corpus(
    copies: int = 3, n_background: int = 40, seed: int = 0
) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Training sequences `(n, T)`: `copies` per fact (the fact at a random place among
    filler) and `n_background` of filler only; with the fact of each sequence (-1 for none)
    and the position of its subject."""
    rng = np.random.default_rng(seed)
    rows: List[np.ndarray] = []
    facts: List[int] = []
    starts: List[int] = []
    for fact in range(N_FACTS):
        for _ in range(copies):
            row = rng.choice(FILLER, size=T)
            start = int(rng.integers(0, T - 2))
            row[start : start + 3] = [SUBJECTS[fact], RELATION, OBJECTS[fact]]
            rows.append(row)
            facts.append(fact)
            starts.append(start)
    for _ in range(n_background):
        rows.append(rng.choice(FILLER, size=T))
        facts.append(-1)
        starts.append(-1)
    return torch.as_tensor(np.stack(rows)), np.array(facts), np.array(starts)


def queries() -> Dict[str, torch.Tensor]:
    """One query per fact: filler, subject, relation, object; measured on the object."""
    ids = torch.tensor([[FILLER[0], SUBJECTS[k], RELATION, OBJECTS[k]] for k in range(N_FACTS)])
    completion = torch.zeros_like(ids)
    completion[:, -1] = 1
    return {"input_ids": ids, "completion_mask": completion}


def train(model: torch.nn.Module, ids: torch.Tensor, steps: int = 200) -> torch.nn.Module:
    """Full-batch AdamW on the next-token loss; the model is returned in eval mode."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return model.eval()


@dataclass
class Result:
    """Recall@10 of the planted sequences for each query (mean over queries), the fraction of
    planted sequences whose top-scored token is one of the fact's tokens, and the model's
    accuracy on the queries' objects."""

    recall_at_10: float
    fact_token_top: float
    query_accuracy: float


def main(copies: int = 3, n_background: int = 40, steps: int = 200, seed: int = 0) -> Result:
    ids, facts, starts = corpus(copies, n_background, seed)
    model = train(tiny_gpt2(seed), ids, steps)
    q = queries()
    with torch.no_grad():
        predicted = model(input_ids=q["input_ids"]).logits[:, -2].argmax(-1)
    accuracy = float((predicted == q["input_ids"][:, -1]).double().mean())
    logger.info("Query accuracy after training: %.2f", accuracy)

    layers = [name for name, module in model.named_modules() if is_conv1d(module)]
    x = {"input_ids": ids}
    influence = EkfacInfluence(model, True, loss=CausalLMTask(), regularization=0.01, layers=layers)
    influence.fit([(x, ids)])
    scores = influence.influences(q, q["input_ids"], x, ids)  # (n_queries, n_train)
    top = scores.topk(10, dim=1).indices.numpy()
    recall = float(
        np.mean([np.isin(np.flatnonzero(facts == k), top[k]).mean() for k in range(N_FACTS)])
    )
    logger.info("Recall@10 of the planted sequences: %.2f", recall)

    planted = np.flatnonzero(facts >= 0)
    tokens = influence.influences(
        q, q["input_ids"], {"input_ids": ids[planted]}, ids[planted], per_token="train"
    )  # (n_queries, n_planted, T)
    hits = []
    for column, j in enumerate(planted):
        best = int(tokens[facts[j], column].argmax())
        hits.append(starts[j] <= best <= starts[j] + 2)
    fact_top = float(np.mean(hits))
    logger.info("Planted sequences whose top token is one of the fact's: %.2f", fact_top)
    return Result(recall, fact_top, accuracy)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(main())
