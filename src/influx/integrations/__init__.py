"""Influence from inside training frameworks.

* [influx.integrations.huggingface][influx.integrations.huggingface]: `InfluenceCallback`, a
  `transformers.TrainerCallback` (the `hf` extra).

Plain PyTorch loops use [InfluenceTracker][influx.torch.workflows.tracker.InfluenceTracker] directly.
Importing this package imports no training framework: each module imports its own.
"""
