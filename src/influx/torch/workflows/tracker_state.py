r"""What a training-loop tracker keeps and what it restores.

* [Checkpoint][influx.torch.workflows.tracker_state.Checkpoint]: the parameters of the model at one
  step (only those: no buffers, no optimizer state), in memory or in a file (`torch.save` of
  the dict, or safetensors);
* [preserved_training_state][influx.torch.workflows.tracker_state.preserved_training_state]: the
  context of the tracker's own passes, which leaves the training as it was: the modules'
  train/eval flags, the random states of Python, numpy and torch and the generators of the
  data loaders it reads are saved before and restored after.

A `DataLoader` draws a seed from its generator (the global torch generator by default) each
time it is iterated, even without shuffling: reading the training data for a ranking would
otherwise change the next shuffle of the training loop.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np

import torch

__all__ = ["Checkpoint", "FORMATS", "eval_mode", "loader_generators", "preserved_training_state"]

FORMATS = ("torch", "safetensors")
"""The file formats of checkpoints."""


@dataclass(frozen=True)
class Checkpoint:
    """The parameters of the model at one point of the run.

    Attributes:
        step: the number of `on_step` calls before it was taken.
        epoch: the number of `on_epoch_end` calls before it was taken.
        learning_rate: the learning rate at that point ($\\eta_k$ of TracIn-CP).
        parameters: the parameters by name (in memory), or None when stored in `path`.
        path: the file holding them (a safetensors file or a `torch.save` of a dict).
    """

    step: int
    epoch: int
    learning_rate: float
    parameters: Optional[Dict[str, torch.Tensor]] = None
    path: Optional[Path] = None

    def load(self) -> Dict[str, torch.Tensor]:
        """The parameters by name."""
        if self.parameters is not None:
            return self.parameters
        assert self.path is not None
        if self.path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(self.path))
        state: Dict[str, torch.Tensor] = torch.load(self.path, weights_only=True)
        return state

    @staticmethod
    def take(
        model: torch.nn.Module,
        step: int,
        epoch: int,
        learning_rate: float,
        directory: Optional[Path] = None,
        file_format: str = "torch",
    ) -> "Checkpoint":
        """A copy of `model`'s parameters, kept in memory or written into `directory` as
        `checkpoint-<step>.pt` (`torch.save`) or `.safetensors`."""
        parameters = {name: p.detach().clone().contiguous() for name, p in model.named_parameters()}
        if directory is None:
            return Checkpoint(step, epoch, learning_rate, parameters=parameters)
        directory.mkdir(parents=True, exist_ok=True)
        suffix = "safetensors" if file_format == "safetensors" else "pt"
        path = directory / f"checkpoint-{step:08d}.{suffix}"
        if suffix == "safetensors":
            from safetensors.torch import save_file

            save_file(parameters, str(path))
        else:
            torch.save(parameters, path)
        return Checkpoint(step, epoch, learning_rate, path=path)


def loader_generators(loaders: Iterable[Any]) -> List[torch.Generator]:
    """The random generators a data loader draws from: its own, its sampler's, its batch
    sampler's sampler's (each once)."""
    found: Dict[int, torch.Generator] = {}
    for loader in loaders:
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, sampler, getattr(batch_sampler, "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator):
                found[id(generator)] = generator
    return list(found.values())


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run a block with `model` in eval mode; restore every module's train/eval flag after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def preserved_training_state(model: torch.nn.Module, loaders: Iterable[Any]) -> Iterator[None]:
    """Run a block with `model` in eval mode and leave the training as it was.

    Saves and restores the train/eval flag of every module, the global random states of
    Python, numpy and torch (CPU and initialised CUDA devices) and the states of the
    generators of `loaders` (see `loader_generators`).
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    generators = [(g, g.get_state()) for g in loader_generators(loaders)]
    try:
        with eval_mode(model):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        for generator, state in generators:
            generator.set_state(state)
