"""Write the files of the command-line example: data, trained weights, flipped labels.

Three Gaussian classes in 4 dimensions; 120 training points of which 6 have a wrong label,
40 validation points. Writes `train.pt` (a tuple `(x, y)` of tensors), `validation.npz`
(arrays `x` and `y`), `weights.pt` (the state dict of `tiny_model.make_model()` trained on
the noisy labels) and `flipped.txt` (the indices of the wrong labels).

Run it in the directory that holds `tiny_model.py`: `python prepare.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tiny_model import make_model

import torch


def blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` points of three Gaussian classes with centres on the first three axes."""
    y = torch.arange(n) % 3
    centres = 4.0 * torch.eye(3, 4, dtype=torch.float64)
    x = centres[y] + torch.randn(n, 4, generator=generator, dtype=torch.float64)
    return x, y


def main(directory: Path = Path(".")) -> Path:
    """Write the example's files to `directory` and return it."""
    generator = torch.Generator().manual_seed(0)
    x, y = blobs(120, generator)
    x_val, y_val = blobs(40, generator)
    flipped = torch.randperm(120, generator=generator)[:6]
    y[flipped] = (y[flipped] + 1) % 3

    torch.manual_seed(0)
    net = make_model()
    optimizer = torch.optim.LBFGS(net.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        decay = sum((p**2).sum() for p in net.parameters())
        loss = torch.nn.functional.cross_entropy(net(x), y) + 1e-3 * decay
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.save(net.state_dict(), directory / "weights.pt")
    torch.save((x, y), directory / "train.pt")
    np.savez(directory / "validation.npz", x=x_val.numpy(), y=y_val.numpy())
    (directory / "flipped.txt").write_text(" ".join(map(str, sorted(flipped.tolist()))) + "\n")
    return directory


if __name__ == "__main__":
    main()
