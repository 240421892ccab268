"""Rank flipped labels while a Hugging Face `Trainer` trains a tiny BERT.

The token task and the one-layer BERT of `text_classification.py` (built from a config:
nothing is downloaded), 10% of the training labels flipped. An `InfluenceCallback` follows
`Trainer.train()`: it keeps a checkpoint every epoch and, at the end, ranks the training
samples by their total influence on a held-out set with EK-FAC on the Linear layers of the
encoder, through the example's `Task` (the model is called on the collator's dict batches),
logs the most harmful samples and writes a report. The detection of the flipped labels is
scored by the area under the ROC curve, for the final model and for EK-FAC averaged over the
checkpoints.

Needs `transformers` and `accelerate` (`pip install influx[hf]`).
Run: `python examples/trainer_callback.py [report directory]`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

import text_classification as tc
from transformers import Trainer, TrainingArguments

from influx.integrations.huggingface import InfluenceCallback
from influx.torch.workflows.tracker_report import detection_auc

logger = logging.getLogger("trainer_callback")

LAYERS = [
    "bert.encoder.layer.0.attention.self.query",
    "bert.encoder.layer.0.attention.self.key",
    "bert.encoder.layer.0.attention.self.value",
    "bert.encoder.layer.0.attention.output.dense",
    "bert.encoder.layer.0.intermediate.dense",
    "bert.encoder.layer.0.output.dense",
    "bert.pooler.dense",
    "classifier",
]
"""The Linear layers: EK-FAC has no Kronecker factors for embeddings and layer norms."""


def main(
    n_train: int = 400,
    n_val: int = 100,
    epochs: int = 6,
    seed: int = 0,
    report_dir: Optional[Path] = None,
) -> Dict[str, float]:
    """Train with the callback; return the detection AUC of each ranking."""
    x, y, flipped = tc.token_data(n_train, seed, flip_fraction=0.1)
    x_val, y_val, _ = tc.token_data(n_val, seed + 1)
    train, validation = tc.TokenDataset(x, y), tc.TokenDataset(x_val, y_val)
    callback = InfluenceCallback(
        train,
        validation,
        tc.SequenceClassification(),
        batch_size=50,
        method="ekfac",
        regularization=0.1,
        method_options={"layers": LAYERS},
        checkpoint_every=2,
        suspected=flipped,
        report_dir=report_dir,
    )
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            num_train_epochs=epochs,
            per_device_train_batch_size=25,
            learning_rate=0.01,
            weight_decay=0.01,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            seed=seed,
        )
        net = tc.tiny_bert(seed)
        Trainer(net, args, train_dataset=train, callbacks=[callback]).train()
    accuracy = float((net.eval()(**x_val).logits.argmax(1) == y_val).double().mean())
    logger.info("Validation accuracy: %.0f%%", 100 * accuracy)
    assert callback.ranking is not None and callback.tracker is not None
    result = {"accuracy": accuracy, "EK-FAC, final model": detection_auc(callback.ranking, flipped)}
    averaged = callback.tracker.rank("influence")
    result["EK-FAC, checkpoint average"] = detection_auc(averaged, flipped)
    for name in ("EK-FAC, final model", "EK-FAC, checkpoint average"):
        logger.info("%s: flipped-label detection AUC %.3f", name, result[name])
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(report_dir=Path(sys.argv[1]) if len(sys.argv) > 1 else None)
