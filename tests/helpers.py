"""Small float64 models and data with closed forms, shared by the tests.

Import from here (`from helpers import make_mlp`); fixtures live in `conftest.py`.
"""

from __future__ import annotations

from typing import Dict, Tuple

from torch.utils.data import DataLoader, TensorDataset

import torch


class LinearRegression:
    """y = W x + b with MSE (mean over samples and outputs), with closed forms."""

    def __init__(self, n: int = 40, d: int = 4, m: int = 3, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.d, self.m = d, m
        self.model = torch.nn.Linear(d, m)
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(m, d, generator=gen))
            self.model.bias.copy_(torch.randn(m, generator=gen))
        self.x = torch.randn(n, d, generator=gen)
        self.y = torch.randn(n, m, generator=gen)
        self.x_test = torch.randn(7, d, generator=gen)
        self.y_test = torch.randn(7, m, generator=gen)
        self.loss = torch.nn.functional.mse_loss

    @property
    def n_params(self) -> int:
        return self.m * self.d + self.m

    def jac(self, x: torch.Tensor) -> torch.Tensor:
        """d(Wx+b)/d(vec W, b) per sample: (N, m, P), W flattened row-major."""
        eye = torch.eye(self.m)
        jw = torch.einsum("ik,nj->nikj", eye, x).reshape(x.shape[0], self.m, self.m * self.d)
        jb = eye.expand(x.shape[0], self.m, self.m)
        return torch.cat([jw, jb], dim=2)

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return x @ self.model.weight.T + self.model.bias - y

    def grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, P): (2/m) J^T r."""
        r = self.residual(x, y)
        return 2.0 / self.m * torch.einsum("nkp,nk->np", self.jac(x), r)

    def hessian(self) -> torch.Tensor:
        j = self.jac(self.x)
        return 2.0 / self.m * torch.einsum("nkp,nkq->pq", j, j) / self.x.shape[0]

    def gauss_newton(self) -> torch.Tensor:
        g = self.grads(self.x, self.y)
        return g.T @ g / g.shape[0]

    def mixed_grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, F, P): d/dx_l of the per-sample gradient."""
        w = self.model.weight.detach()
        r = self.residual(x, y)
        n, m, d = x.shape[0], self.m, self.d
        # g_W[k, j] = (2/m) r_k x_j -> d/dx_l = (2/m) (W[k, l] x_j + r_k delta_jl)
        gw = torch.einsum("kl,nj->nlkj", w, x) + torch.einsum("nk,jl->nlkj", r, torch.eye(d))
        gb = w.T.expand(n, d, m)  # d/dx_l of r_k is W[k, l]
        return 2.0 / m * torch.cat([gw.reshape(n, d, m * d), gb], dim=2)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def make_mlp(d_in: int = 5, hidden: int = 6, d_out: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d_out)
    )


def classification_data(
    n: int = 60, d_in: int = 5, n_classes: int = 3, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    y = torch.randint(0, n_classes, (n,), generator=gen)
    return x, y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error |a - b| / |b|."""
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


LM_VOCAB = 11
"""The vocabulary of the tiny GPT-2 of the language-model tests."""


def tiny_gpt2(n_layer: int = 1) -> torch.nn.Module:
    """A GPT-2 from a config (hidden 8, 2 heads, vocabulary 11), float64, in eval mode."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=LM_VOCAB,
        n_positions=8,
        n_embd=8,
        n_layer=n_layer,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def lm_corpus(n: int, seed: int, length: int = 6) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded sequences of `length` tokens (at least 4 real ones) with a completion
    mask on their last two tokens: `(x, labels)`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, LM_VOCAB, (n, length), generator=g)
    lengths = torch.randint(4, length + 1, (n,), generator=g)
    positions = torch.arange(length)[None, :]
    mask = positions < lengths[:, None]
    completion = mask & (positions >= lengths[:, None] - 2)
    ids = ids.masked_fill(~mask, 0)
    x = {"input_ids": ids, "attention_mask": mask.long(), "completion_mask": completion.long()}
    return x, ids.masked_fill(~mask, -100)
