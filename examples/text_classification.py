"""Find flipped labels of a text classifier: a tiny BERT on a synthetic token task.

A one-layer BERT-style classifier (hidden size 16, 2 heads, vocabulary of 50, built from a
config: nothing is downloaded) learns whether a sequence of tokens holds one of the trigger
tokens (ids 2-5). Sequences have different lengths and are
padded, with an attention mask. 10% of the training labels are flipped; the training points
are ranked by their total influence on a held-out set, with EK-FAC and with conjugate
gradients, and the detection of the flipped labels is scored by the area under the ROC curve.

Batches are dicts `{"input_ids", "attention_mask"}`, passed to the model as keyword
arguments; its `SequenceClassifierOutput` is reduced to its logits before the loss. The task
below hands the model a 4-D additive attention mask instead of the 2-D padding mask: the
model then has no branch on the mask's values and per-sample gradients are one `vmap` call
(with the 2-D mask influx falls back to slower passes, with the same values).

Needs `transformers` (`pip install influx[hf]`). Run: `python examples/text_classification.py`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import torch
from influx.torch import CgInfluence, EkfacInfluence, SecondOrderMode, Task, rank_training_points

logger = logging.getLogger("text_classification")

VOCABULARY, MAX_LENGTH, PAD, CLS = 50, 12, 0, 1
TRIGGERS = np.arange(2, 6)
"""The tokens whose presence makes a sequence positive."""


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    """A BERT-style sequence classifier: 1 layer, hidden size 16, 2 heads, 2 classes."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCABULARY,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=MAX_LENGTH,
        type_vocab_size=1,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = "eager"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # initialised in float64, whatever the default
    try:
        return BertForSequenceClassification(config).eval()
    finally:
        torch.set_default_dtype(previous)


def token_data(
    n: int, seed: int, flip_fraction: float = 0.0
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, np.ndarray]:
    """`n` padded sequences, their labels (whether a trigger token occurs) and the
    indices of the flipped labels."""
    rng = np.random.default_rng(seed)
    ids = np.full((n, MAX_LENGTH), PAD)
    mask = np.zeros((n, MAX_LENGTH), dtype=np.int64)
    labels = np.zeros(n, dtype=np.int64)
    for i in range(n):
        length = int(rng.integers(4, MAX_LENGTH))
        tokens = rng.integers(2, VOCABULARY, size=length)
        ids[i, 0], ids[i, 1 : length + 1] = CLS, tokens
        mask[i, : length + 1] = 1
        labels[i] = int(bool(np.isin(tokens, TRIGGERS).any()))
    flipped = rng.choice(n, size=int(flip_fraction * n), replace=False)
    labels[flipped] = 1 - labels[flipped]
    x = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask)}
    return x, torch.as_tensor(labels), np.sort(flipped)


def additive_attention_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D additive mask `(N, 1, 1, L)` of a 2-D padding mask: 0 where attended, the
    most negative number of `dtype` where padded."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class SequenceClassification(Task):
    """Cross-entropy of the logits, with the padding mask handed over in 4-D."""

    def loss(self, model: Any, x: Any, y: torch.Tensor) -> torch.Tensor:
        mask = additive_attention_mask(x["attention_mask"], torch.float64)
        return F.cross_entropy(model(input_ids=x["input_ids"], attention_mask=mask).logits, y)


class TokenDataset(Dataset):
    """Dict batches, as a Hugging Face collator makes them (labels under "labels")."""

    def __init__(self, x: Dict[str, torch.Tensor], y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {
            "input_ids": self.x["input_ids"][i],
            "attention_mask": self.x["attention_mask"][i],
            "labels": self.y[i],
        }


def train(
    model: torch.nn.Module, x: Dict[str, torch.Tensor], y: torch.Tensor, steps: int = 200
) -> torch.nn.Module:
    """Full-batch AdamW (weight decay 0.1) with a linear warm-up over the first tenth of the
    steps, a cosine decay to zero after it and gradients clipped to norm 1; the model is
    returned in eval mode. The schedule matters: a constant learning rate either stalls
    (some seeds learn only part of the rule) or memorises the flipped labels."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + np.cos(np.pi * step / steps)),
    )
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(**x).logits, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval()


def detection_auc(values: torch.Tensor, flipped: np.ndarray) -> float:
    """Area under the ROC curve of the score `-values` (most harmful first) for finding the
    flipped labels: the probability that a flipped point is ranked above a clean one."""
    scores = -values.detach().numpy()
    positive = np.zeros(len(scores), dtype=bool)
    positive[flipped] = True
    ranks = scores.argsort().argsort() + 1.0
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class Result:
    """What the example measured: the classifier's validation accuracy and, for each method,
    the area under the ROC curve of finding the flipped labels."""

    accuracy: float
    auc: Dict[str, float]


def main(n_train: int = 400, n_val: int = 100, seed: int = 0) -> Result:
    """Run the example; return the validation accuracy and the detection AUC of each method."""
    x, y, flipped = token_data(n_train, seed, flip_fraction=0.1)
    x_val, y_val, _ = token_data(n_val, seed + 1)
    net = train(tiny_bert(seed), x, y)
    with torch.no_grad():
        accuracy = float((net(**x_val).logits.argmax(1) == y_val).double().mean())
    logger.info("Validation accuracy: %.0f%%", 100 * accuracy)
    # The embeddings and layer norms have no Kronecker-factored representation: freeze them
    # for every method (all of them then use the same parameters, those of the Linear layers).
    for name, parameter in net.named_parameters():
        if "embeddings" in name or "LayerNorm" in name:
            parameter.requires_grad_(False)
    train_loader = DataLoader(TokenDataset(x, y), batch_size=50)
    val_loader = DataLoader(TokenDataset(x_val, y_val), batch_size=50)
    task = SequenceClassification()
    models = {
        "EK-FAC": EkfacInfluence(net, True, loss=task, regularization=0.1),
        "CG": CgInfluence(
            net, task, regularization=0.3, rtol=1e-8, second_order_mode=SecondOrderMode.GAUSS_NEWTON
        ),
    }
    auc = {}
    for name, model in models.items():
        ranking = rank_training_points(model.fit(train_loader), train_loader, val_loader)
        auc[name] = detection_auc(ranking.values, flipped)
        logger.info("%s: flipped-label detection AUC %.3f", name, auc[name])
    return Result(accuracy, auc)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
