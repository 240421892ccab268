"""The model factory of the command-line example: `influx rank --model tiny_model:make_model`.

The factory is called without arguments and returns the untrained network; the command line
then loads the trained weights into it.
"""

import torch


def make_model() -> torch.nn.Module:
    """A 4-8-3 tanh network in float64."""
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
