r"""A Hugging Face `Trainer` callback that ranks harmful training samples as the model trains.

```python
from influx.integrations.huggingface import InfluenceCallback

callback = InfluenceCallback(
    train_dataset, validation_dataset, task, method="ekfac", regularization=0.01,
    report_dir="influence-report",
)
trainer = Trainer(model, args, train_dataset=train_dataset, callbacks=[callback])
trainer.train()
callback.ranking  # a HarmfulRanking of train_dataset, most harmful first
```

The callback runs an [InfluenceTracker][influx.torch.workflows.tracker.InfluenceTracker] on the
Trainer's model: it counts the optimizer steps (`on_step_end`) and epochs (`on_epoch_end`),
keeps checkpoints and ranks on the tracker's schedules, and ranks at the end of training
(`on_train_end`), logging a summary and writing a report when `report_dir` is given. The
training data is read in its own order through a non-shuffling `DataLoader` with the data
collator, so the ranking's indices are those of `train_dataset`; batches are dicts with a
`"labels"` entry, as the Trainer's are. Like the tracker, the callback does not change the
training (weights, optimizer state, random streams).

Needs `transformers` (`pip install influx[hf]`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from torch.utils.data import DataLoader, Dataset

import torch

from ..torch.data.task import Task
from ..torch.workflows.tracker import InfluenceTracker
from ..torch.workflows.valuation import HarmfulRanking

try:
    from transformers import TrainerCallback, default_data_collator
except ImportError as error:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "influx.integrations.huggingface needs transformers: pip install influx[hf]"
    ) from error

__all__ = ["InfluenceCallback"]

logger = logging.getLogger(__name__)


def _learning_rate(optimizer: Any) -> Optional[float]:
    """The learning rate of the optimizer's first parameter group, if there is one."""
    groups = getattr(optimizer, "param_groups", None)
    return float(groups[0]["lr"]) if groups else None


class InfluenceCallback(TrainerCallback):  # type: ignore[misc]
    r"""Rank the training samples of a `Trainer` run by their influence on a validation set.

    Args:
        train_dataset: the training samples to rank (usually the Trainer's `train_dataset`);
            the ranking's indices are its indices.
        validation_dataset: the samples whose total loss (or the task's measurement) the
            influence is measured on.
        loss: a [Task][influx.torch.data.task.Task] or a loss `loss(logits, labels)`; the default
            is the cross-entropy of the model's logits.
        data_collator: makes batches of samples (default: transformers'
            `default_data_collator`); its batches must be dicts with a `"labels"` entry.
        batch_size: the batch size of the callback's own passes.
        method: the influence model, as for the tracker (`"ekfac"`, `"cg"`, ...).
        **tracker_options: further arguments of
            [InfluenceTracker][influx.torch.workflows.tracker.InfluenceTracker] (`regularization`,
            `method_options`, `rank_every`, `checkpoint_every`, `checkpoint_averaging`,
            `report_dir`, `suspected`, ...). Its `learning_rate` is read from the Trainer's
            optimizer at each checkpoint.

    Attributes:
        tracker: the tracker of the current run (None before training starts).
        ranking: the ranking made at the end of training (None before).
    """

    def __init__(
        self,
        train_dataset: Dataset,
        validation_dataset: Dataset,
        loss: Optional[Any] = None,
        data_collator: Optional[Callable[[Any], Any]] = None,
        batch_size: int = 32,
        method: Any = "ekfac",
        **tracker_options: Any,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Parameter 'batch_size' must be a positive int, got {batch_size!r}.")
        if data_collator is not None and not callable(data_collator):
            raise TypeError(
                "Parameter 'data_collator' must be callable on a list of samples, got "
                f"{type(data_collator).__name__}."
            )
        if loss is not None and not (isinstance(loss, Task) or callable(loss)):
            raise TypeError(
                "Parameter 'loss' must be a Task, a loss function loss(logits, labels) or None, "
                f"got {type(loss).__name__}."
            )
        if tracker_options.get("gradient_store") is not None:
            raise TypeError(
                "Parameter 'gradient_store' is not available in the callback: the Trainer's "
                "hooks do not see the batches; use InfluenceTracker in your own loop."
            )
        if "learning_rate" in tracker_options:
            raise TypeError(
                "Parameter 'learning_rate' is read from the Trainer's optimizer; do not pass it."
            )
        collate = data_collator or default_data_collator
        self.train_loader = DataLoader(train_dataset, batch_size=batch_size, collate_fn=collate)
        self.validation_loader = DataLoader(
            validation_dataset, batch_size=batch_size, collate_fn=collate
        )
        self.loss = torch.nn.functional.cross_entropy if loss is None else loss
        self.method = method
        self.tracker_options = tracker_options
        self.tracker: Optional[InfluenceTracker] = None
        self.ranking: Optional[HarmfulRanking] = None

    def _tracker(self, model: Any) -> InfluenceTracker:
        if self.tracker is None:
            self.tracker = InfluenceTracker(
                model,
                self.loss,
                self.train_loader,
                self.validation_loader,
                self.method,
                **self.tracker_options,
            )
        return self.tracker

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start a tracker on the Trainer's model (checks the arguments before training)."""
        self.tracker, self.ranking = None, None
        if state.is_world_process_zero:
            self._tracker(kwargs["model"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """One optimizer step: a checkpoint if the step schedule says so."""
        if state.is_world_process_zero:
            self._tracker(kwargs["model"]).on_step(_learning_rate(kwargs.get("optimizer")))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """One epoch: a checkpoint and a ranking if the epoch schedules say so."""
        if state.is_world_process_zero:
            self._tracker(kwargs["model"]).on_epoch_end(_learning_rate(kwargs.get("optimizer")))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Rank the training samples, log the summary and write the report."""
        if state.is_world_process_zero:
            self.ranking = self._tracker(kwargs["model"]).finish()
