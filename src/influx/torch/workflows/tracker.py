r"""Rank harmful training points from inside a training loop, without changing the training.

An [InfluenceTracker][influx.torch.workflows.tracker.InfluenceTracker] is told about the steps and
epochs of a plain PyTorch loop. It keeps checkpoints of the parameters on a schedule, ranks the
training points by their total influence on a validation set every few epochs and at the end,
logs a summary and writes a report (see [influx.torch.workflows.tracker_report][influx.torch.workflows.tracker_report]).

The ranking at the end is the one of
[rank_training_points][influx.torch.workflows.valuation.rank_training_points] on the final model. Over
the checkpoints $\theta_1, \dots, \theta_K$ of the run the tracker also offers

* **TracIn-CP**: the learning-rate-weighted sum of gradient products,
  $T_j = \sum_k \eta_k \big(\sum_i \nabla_\theta m(z'_i; \theta_k)\big)^\top
  \nabla_\theta \ell(z_j; \theta_k)$;
* **checkpoint-averaged influence**: the chosen influence model fitted at every checkpoint,
  $T_j = \frac{1}{K} \sum_k \big(\sum_i \nabla_\theta m(z'_i; \theta_k)\big)^\top
  (C_k + \lambda I)^{-1} \nabla_\theta \ell(z_j; \theta_k)$.

Everything the tracker computes leaves the training untouched: parameters, buffers and
gradients of the model are not written, the modules' train/eval flags are restored after its
own passes (made in eval mode), and the random streams of torch, numpy and Python, and the
generators of the loaders it reads, are saved before each pass and restored after it (see
[influx.torch.workflows.tracker_state][influx.torch.workflows.tracker_state]). A gradient store that captures the
training step's gradients hooks the Linear / Conv2d layers while it records, to read only
(see [influx.torch.workflows.tracker_store][influx.torch.workflows.tracker_store]).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch

from ..composition.composable import TorchComposableInfluence
from ..data.batches import iterate_batches, split_batch
from ..data.task import Task
from ..data.validation import check_ordered, check_positive_int
from ..models.cg import CgInfluence
from ..models.direct import DirectInfluence
from ..models.ekfac import EkfacInfluence
from ..models.inverse_harmonic_mean import InverseHarmonicMeanInfluence
from ..models.lissa import LissaInfluence
from ..models.low_rank import ArnoldiInfluence, NystroemSketchInfluence
from ..models.projected import ProjectedInfluence
from .checkpoint_averaging import average_over_checkpoints, tracin_values
from .tracker_report import as_index_list, log_summary, write_report
from .tracker_state import FORMATS, Checkpoint, eval_mode, preserved_training_state
from .tracker_store import GradientRecorder, first_recording_epoch
from .valuation import HarmfulRanking, rank_training_points

if TYPE_CHECKING:  # pragma: no cover
    from .gradient_store import GradientStore

__all__ = ["InfluenceTracker", "METHODS"]

logger = logging.getLogger(__name__)

METHODS: Dict[str, Any] = {
    "direct": (DirectInfluence, {}),
    "cg": (CgInfluence, {}),
    "lissa": (LissaInfluence, {}),
    "arnoldi": (ArnoldiInfluence, {"rank": 10}),
    "nystroem": (NystroemSketchInfluence, {"rank": 10}),
    "ihm": (InverseHarmonicMeanInfluence, {}),
    "ekfac": (EkfacInfluence, {"update_diagonal": True}),
    "projected": (ProjectedInfluence, {}),
}
"""The influence models of `method`, by name: the class and its default keyword arguments."""

AVERAGING = (None, "tracin", "influence")

LossOrTask = Union[Callable[..., torch.Tensor], Task]
MethodType = Union[str, Callable[[torch.nn.Module, LossOrTask], TorchComposableInfluence]]
LearningRate = Union[None, float, torch.optim.Optimizer, Callable[[], float]]


def _check_optional_positive_int(value: Optional[int], name: str) -> Optional[int]:
    if value is not None:
        check_positive_int(value, name)
    return value


class InfluenceTracker:
    r"""Checkpoints and harmful-sample rankings of a training run, from the training loop.

    Call `on_step()` after every optimizer step, `on_epoch_end()` after every epoch and
    `finish()` after training:

    ```python
    tracker = InfluenceTracker(
        net, F.cross_entropy, ordered_train_loader, val_loader, method="ekfac",
        regularization=0.01, report_dir="influence-report",
    )
    for epoch in range(epochs):
        for x, y in shuffled_train_loader:
            ...  # forward, backward, optimizer.step()
            tracker.on_step()
        tracker.on_epoch_end()
    ranking = tracker.finish()  # a HarmfulRanking, most harmful first
    ```

    With `checkpoint_averaging=None` the ranking is that of
    [rank_training_points][influx.torch.workflows.valuation.rank_training_points] with the influence
    model of `method` fitted on `train_loader` at the current parameters: the total
    influence $T_j = \sum_i I(z'_i, z_j)$ of each training point on the validation set,
    negative for harmful points. `"tracin"` ranks by TracIn-CP over the checkpoints,
    $T_j = \sum_k \eta_k \langle \sum_i \nabla_\theta m(z'_i; \theta_k),
    \nabla_\theta \ell(z_j; \theta_k) \rangle$ (the learning rate $\eta_k$ is taken from
    `learning_rate` when the checkpoint is made), and `"influence"` by the mean over the
    checkpoints of the influence model's $T_j$ at each of them (the checkpoints hold
    parameters only: buffers are the model's current ones).

    Args:
        model: the model being trained.
        loss: the training loss `loss(outputs, y)` with mean reduction, or a
            [Task][influx.torch.data.task.Task] (for structured batches, models that compute their
            own loss or a measurement that is not the loss).
        train_loader: the training data in a fixed order (a DataLoader with `shuffle=False`,
            not the loop's shuffling loader): the indices of the ranking are its order.
        validation_loader: the validation data; its order does not matter.
        method: the influence model, by name (`"ekfac"`, `"cg"`, `"direct"`, `"lissa"`,
            `"arnoldi"`, `"nystroem"`, `"ihm"`, `"projected"`), or a callable
            `method(model, loss)` returning an unfitted influence model.
        regularization: $\lambda$ of the influence model (None: the model's default).
        method_options: further keyword arguments of the influence model's class.
        rank_every: rank every this many epochs (in `on_epoch_end`); None ranks at
            `finish` only.
        checkpoint_every: keep a checkpoint every this many epochs.
        checkpoint_every_steps: keep a checkpoint every this many steps.
        checkpoint_dir: where to write checkpoints; None keeps them in memory.
        checkpoint_format: `"torch"` (`torch.save` of the parameters' dict) or
            `"safetensors"`.
        checkpoint_averaging: None (the current model), `"tracin"` or `"influence"`.
        learning_rate: $\eta_k$ for TracIn-CP: a number, an optimizer (the learning rate of
            its first parameter group) or a callable returning it; None weighs every
            checkpoint by 1.
        suspected: training indices suspected to be harmful (e.g. known flipped labels): the
            report then holds the detection curve and its AUC.
        report_dir: where to write reports (`finish` writes into it, intermediate rankings
            into `epoch_<k>` subdirectories); None writes none.
        top_k: how many of the most harmful points the summary names.
        plots: draw the reports' plots (needs matplotlib, the `plot` extra).
        gradient_store: a zarr path: record the projected gradient of every training batch
            passed to `on_step` (with its indices) and write them there, in the format of the
            [GradientStore][influx.torch.workflows.gradient_store.GradientStore] (see
            [influx.torch.workflows.tracker_store][influx.torch.workflows.tracker_store]); `finish` opens it as
            `tracker.store`.
        gradient_store_options: keyword arguments of the
            [ProjectedInfluence][influx.torch.models.projected.ProjectedInfluence] that
            projects them (`projection_dim`, `projection`, `seed`, `regularization`, ...).
        epochs: the number of epochs of the loop (needed by the gradient store's default).
        gradient_store_from_epoch: record from this epoch on; None (the default): the last of
            `epochs`, the gradients near the final parameters that influence uses; 0: every
            step (TracIn-style uses). A point keeps the gradient of its last recorded step.
        gradient_store_capture: take the gradients of Linear / Conv2d layers from the
            training step's own forward and backward passes (hooks on those layers, removed
            by `finish`; the loss must be the batch mean) instead of a pass of the tracker
            (see [influx.torch.workflows.tracker_store][influx.torch.workflows.tracker_store]).
        progress: show progress bars during the rankings.

    Attributes:
        rankings: the rankings made so far, by epoch (`finish` stores its own under the
            epoch it ran at).
        checkpoints: the checkpoints kept so far.

    Raises:
        UnorderedDataError: if `train_loader` shuffles (or otherwise has no fixed order).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossOrTask,
        train_loader: Iterable,
        validation_loader: Iterable,
        method: MethodType = "ekfac",
        regularization: Optional[float] = None,
        method_options: Optional[Mapping[str, Any]] = None,
        rank_every: Optional[int] = None,
        checkpoint_every: Optional[int] = None,
        checkpoint_every_steps: Optional[int] = None,
        checkpoint_dir: Optional[Union[str, Path]] = None,
        checkpoint_format: str = "torch",
        checkpoint_averaging: Optional[str] = None,
        learning_rate: LearningRate = None,
        suspected: Optional[Iterable[int]] = None,
        report_dir: Optional[Union[str, Path]] = None,
        top_k: int = 10,
        plots: bool = True,
        gradient_store: Optional[Union[str, Path]] = None,
        gradient_store_options: Optional[Mapping[str, Any]] = None,
        epochs: Optional[int] = None,
        gradient_store_from_epoch: Optional[int] = None,
        gradient_store_capture: bool = True,
        progress: bool = False,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"Parameter 'model' must be a torch.nn.Module, got {type(model).__name__}."
            )
        if not (isinstance(loss, Task) or callable(loss)):
            raise TypeError(
                "Parameter 'loss' must be a loss function loss(outputs, y) or a Task, got "
                f"{type(loss).__name__}."
            )
        check_ordered(train_loader, "train_loader")
        for name, loader in (
            ("train_loader", train_loader),
            ("validation_loader", validation_loader),
        ):
            if not isinstance(loader, Iterable):
                raise TypeError(
                    f"Parameter '{name}' must be an iterable of batches (e.g. a DataLoader), "
                    f"got {type(loader).__name__}."
                )
        self.model, self.loss = model, loss
        self.train_loader, self.validation_loader = train_loader, validation_loader
        self.method, self.regularization = method, regularization
        self.method_options = dict(method_options or {})
        self._check_method()
        self.rank_every = _check_optional_positive_int(rank_every, "rank_every")
        if checkpoint_averaging not in AVERAGING:
            raise ValueError(
                f"Parameter 'checkpoint_averaging' must be one of {list(AVERAGING)}, got "
                f"{checkpoint_averaging!r}."
            )
        self.checkpoint_averaging = checkpoint_averaging
        self.checkpoint_every = _check_optional_positive_int(checkpoint_every, "checkpoint_every")
        self.checkpoint_every_steps = _check_optional_positive_int(
            checkpoint_every_steps, "checkpoint_every_steps"
        )
        if checkpoint_averaging and checkpoint_every is None and checkpoint_every_steps is None:
            self.checkpoint_every = 1
        if checkpoint_format not in FORMATS:
            raise ValueError(
                f"Parameter 'checkpoint_format' must be one of {list(FORMATS)}, got "
                f"{checkpoint_format!r}."
            )
        self.checkpoint_format = checkpoint_format
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        if not (
            learning_rate is None
            or callable(learning_rate)
            or isinstance(learning_rate, torch.optim.Optimizer)
            or (isinstance(learning_rate, (int, float)) and not isinstance(learning_rate, bool))
        ):
            raise TypeError(
                "Parameter 'learning_rate' must be a number, an optimizer, a callable or None, "
                f"got {type(learning_rate).__name__}."
            )
        self.learning_rate = learning_rate
        self.suspected = as_index_list(suspected)  # type: ignore[arg-type]
        self.report_dir = None if report_dir is None else Path(report_dir)
        check_positive_int(top_k, "top_k")
        self.top_k, self.plots, self.progress = top_k, bool(plots), progress
        self.gradient_store = None if gradient_store is None else Path(gradient_store)
        self.gradient_store_options = dict(gradient_store_options or {})
        self.gradient_store_from_epoch = first_recording_epoch(
            self.gradient_store, gradient_store_from_epoch, epochs
        )
        self.gradient_store_capture = bool(gradient_store_capture)
        self.recorder: Optional[GradientRecorder] = None
        self.store: Optional["GradientStore"] = None
        if self.gradient_store is not None and self.gradient_store_from_epoch == 0:
            self._start_recorder()
        self.step, self.epoch = 0, 0
        self.checkpoints: List[Checkpoint] = []
        self.rankings: Dict[int, HarmfulRanking] = {}

    # -- the training loop's hooks --------------------------------------------------------

    def on_step(
        self,
        learning_rate: Optional[float] = None,
        batch: Any = None,
        indices: Any = None,
    ) -> None:
        """Count one optimizer step; keep a checkpoint when the step schedule says so; with a
        gradient store, record the projected gradients of the step's batch.

        Args:
            learning_rate: the step's learning rate (overrides the tracker's `learning_rate`).
            batch: the step's training batch, `(x, y)` or a dict with `"labels"` (needed
                with `gradient_store`).
            indices: the training indices of its samples (in the order of `train_loader`).
        """
        self.step += 1
        if self.gradient_store is not None and self.epoch >= self.gradient_store_from_epoch:
            if batch is None or indices is None:
                raise ValueError(
                    "Parameters 'batch' and 'indices' of on_step are required with a "
                    f"gradient store, got batch={type(batch).__name__} and "
                    f"indices={type(indices).__name__}."
                )
            self.record_gradients(batch, indices)
        if self.checkpoint_every_steps and self.step % self.checkpoint_every_steps == 0:
            self.save_checkpoint(learning_rate)

    def on_epoch_end(self, learning_rate: Optional[float] = None) -> Optional[HarmfulRanking]:
        """Count one epoch; keep a checkpoint and rank when the schedules say so.

        Returns:
            The ranking made at this epoch, or None.
        """
        self.epoch += 1
        if self.gradient_store is not None and self.epoch == self.gradient_store_from_epoch:
            self._start_recorder()
        if self.checkpoint_every and self.epoch % self.checkpoint_every == 0:
            self.save_checkpoint(learning_rate)
        if self.rank_every and self.epoch % self.rank_every == 0:
            report = None if self.report_dir is None else self.report_dir / f"epoch_{self.epoch}"
            return self._rank_and_report(report)
        return None

    def finish(self) -> HarmfulRanking:
        """Rank the training points now (as `checkpoint_averaging` says), log the summary and
        write the report into `report_dir`; return the ranking. With a gradient store, write
        it and open it as `tracker.store` (fitting its curvature at the final parameters)."""
        if self.recorder is not None:
            with self._preserved():
                self.store = self.recorder.store(self.train_loader)
            logger.info("Projected training gradients written to %s.", self.gradient_store)
        return self._rank_and_report(self.report_dir)

    def record_gradients(self, batch: Any, indices: Any) -> None:
        """Record the projected gradients of a training batch at the current parameters
        (called by `on_step`; call it yourself to record before the optimizer step)."""
        if self.gradient_store is None:
            raise ValueError(
                "Parameter 'gradient_store' must be a path to record gradients, got None."
            )
        x, y = split_batch(batch, "batch")
        recorder = self._start_recorder()
        # projected gradients draw no random numbers and read no loader: the modes suffice
        recorder.record(x, y, indices, self.step, lambda: eval_mode(self.model))

    def _start_recorder(self) -> GradientRecorder:
        """The gradient recorder (made on first use: its projection, and its hooks)."""
        if self.recorder is None:
            assert self.gradient_store is not None
            rows = int(getattr(self.train_loader, "batch_size", None) or 1024)
            store, options = self.gradient_store, self.gradient_store_options
            capture = self.gradient_store_capture
            with self._preserved():
                self.recorder = GradientRecorder(
                    self.model, self.loss, store, self._n_train(), options, rows, capture=capture
                )
        return self.recorder

    # -- checkpoints ------------------------------------------------------------------------

    def _current_learning_rate(self, override: Optional[float]) -> float:
        if override is not None:
            return float(override)
        lr = self.learning_rate
        if lr is None:
            return 1.0
        if isinstance(lr, torch.optim.Optimizer):
            return float(lr.param_groups[0]["lr"])
        if callable(lr):
            return float(lr())
        return float(lr)

    def save_checkpoint(self, learning_rate: Optional[float] = None) -> Checkpoint:
        """Keep the model's current parameters (in memory or in `checkpoint_dir`)."""
        checkpoint = Checkpoint.take(
            self.model,
            self.step,
            self.epoch,
            self._current_learning_rate(learning_rate),
            self.checkpoint_dir,
            self.checkpoint_format,
        )
        self.checkpoints.append(checkpoint)
        logger.debug("Checkpoint at step %d (epoch %d).", self.step, self.epoch)
        return checkpoint

    # -- rankings ---------------------------------------------------------------------------

    def _check_method(self) -> None:
        method = self.method
        if callable(method):
            return
        if not isinstance(method, str):
            raise TypeError(
                "Parameter 'method' must be a method name or a callable method(model, loss), "
                f"got {type(method).__name__}."
            )
        if method not in METHODS:
            raise ValueError(
                f"Parameter 'method' must be one of {sorted(METHODS)}, got {method!r}."
            )
        parameters = inspect.signature(METHODS[method][0]).parameters
        unknown = sorted(k for k in self.method_options if k not in parameters or k == "model")
        if unknown:
            raise ValueError(
                f"Parameter 'method_options' names arguments {unknown} that "
                f"{METHODS[method][0].__name__} does not take; it takes "
                f"{sorted(k for k in parameters if k not in ('model', 'loss'))}."
            )

    def influence_model(self, model: Optional[torch.nn.Module] = None) -> TorchComposableInfluence:
        """The unfitted influence model of `method` for `model` (default: the tracked one)."""
        model = self.model if model is None else model
        if callable(self.method):
            result = self.method(model, self.loss)
            if not isinstance(result, TorchComposableInfluence):
                raise TypeError(
                    "Parameter 'method' must return an influence model "
                    f"(TorchComposableInfluence), got {type(result).__name__}."
                )
            return result
        cls, defaults = METHODS[self.method]
        kwargs = {**defaults, **self.method_options}
        if self.regularization is not None:
            kwargs["regularization"] = self.regularization
        if "progress" in inspect.signature(cls).parameters:
            kwargs.setdefault("progress", self.progress)
        return cls(model, loss=self.loss, **kwargs)  # type: ignore[no-any-return]

    def _n_train(self) -> int:
        dataset = getattr(self.train_loader, "dataset", None)
        try:
            return len(dataset)  # type: ignore[arg-type]
        except TypeError:
            device = next(self.model.parameters()).device
            return sum(len(b) for b in iterate_batches(self.train_loader, device, "train_loader"))

    def _preserved(self) -> "contextlib.AbstractContextManager[None]":
        return preserved_training_state(self.model, [self.train_loader, self.validation_loader])

    def rank(self, checkpoint_averaging: Optional[str] = "current") -> HarmfulRanking:
        """Rank the training points now, without logging or writing a report.

        Args:
            checkpoint_averaging: None (the current model), `"tracin"` or `"influence"`;
                by default the tracker's own setting.
        """
        averaging = (
            self.checkpoint_averaging if checkpoint_averaging == "current" else checkpoint_averaging
        )
        if averaging not in AVERAGING:
            raise ValueError(
                f"Parameter 'checkpoint_averaging' must be one of {list(AVERAGING)}, got "
                f"{averaging!r}."
            )
        with self._preserved():
            if averaging is None:
                return self._rank_model(self.model)
            if not self.checkpoints:
                raise ValueError(
                    f"checkpoint_averaging={averaging!r} needs checkpoints, but none was kept: "
                    "set 'checkpoint_every' or 'checkpoint_every_steps' and call on_step / "
                    "on_epoch_end."
                )
            return self._rank_checkpoints(averaging)

    def _rank_model(self, model: torch.nn.Module) -> HarmfulRanking:
        influence = self.influence_model(model).fit(self.train_loader)  # type: ignore[arg-type]
        return rank_training_points(
            influence, self.train_loader, self.validation_loader, progress=self.progress
        )

    def _rank_checkpoints(self, averaging: str) -> HarmfulRanking:
        return average_over_checkpoints(
            self.model,
            self.checkpoints,
            averaging,
            self._rank_model,
            lambda model: tracin_values(
                model, self.loss, self.train_loader, self.validation_loader
            ),
        )

    def _rank_and_report(self, report_dir: Optional[Path]) -> HarmfulRanking:
        ranking = self.rank()
        self.rankings[self.epoch] = ranking
        how = self.checkpoint_averaging or (
            self.method if isinstance(self.method, str) else "custom"
        )
        context = f"({how}, epoch {self.epoch}, step {self.step})"
        log_summary(ranking, self.top_k, context, self.suspected)
        if report_dir is not None:
            info = {
                "method": self.method if isinstance(self.method, str) else repr(self.method),
                "checkpoint_averaging": self.checkpoint_averaging,
                "checkpoints": [c.step for c in self.checkpoints]
                if self.checkpoint_averaging
                else [],
                "epoch": self.epoch,
                "step": self.step,
            }
            write_report(ranking, report_dir, info, self.suspected, self.top_k, self.plots)
            logger.info("Influence report written to %s.", report_dir)
        return ranking
