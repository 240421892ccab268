r"""Brute-force references shared by the tests: every quantity formed explicitly with
`torch.func`, independently of the library's own code paths.

For a network $f_\theta$, a loss $\ell$ with mean reduction and a batch $(x, y)$ of $n$ points,
over the parameters `params` (a dict `name -> tensor`; None: all trainable parameters, in
`named_parameters()` order, the others held fixed):

* [flat_loss][]: $\theta \mapsto \ell(f_\theta(x), y)$ on the flat parameter vector;
* [exact_hessian][]: $H = \nabla^2_\theta \ell$ by `torch.func.hessian`;
* [per_sample_grads][]: the rows $g_i = \nabla_\theta \ell(f_\theta(x_i), y_i)$;
* [exact_fisher][]: $\frac{1}{n} \sum_i g_i g_i^\top$;
* [explicit_influences][]: $g'^\top (H + \lambda I)^{-1} g$ with an explicit inverse.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from torch.func import functional_call, grad, vmap

import torch

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Params = Optional[Dict[str, torch.Tensor]]


def _selected(net: torch.nn.Module, params: Params) -> Dict[str, torch.Tensor]:
    if params is None:
        return {n: p.detach() for n, p in net.named_parameters() if p.requires_grad}
    return {n: p.detach() for n, p in params.items()}


def flat_loss(
    net: torch.nn.Module, loss: Loss, params: Params, x: Any, y: Any
) -> Tuple[Callable[..., torch.Tensor], torch.Tensor]:
    """`(f, theta)`: the batch loss as a function `f(theta, x=x, y=y)` of the flat parameters
    `params`, and their current values."""
    selected = _selected(net, params)
    names = list(selected)
    shapes = [p.shape for p in selected.values()]
    frozen = {n: p.detach() for n, p in net.named_parameters() if n not in selected}

    def f(theta: torch.Tensor, xx: Any = x, yy: Any = y) -> torch.Tensor:
        parts = torch.split(theta, [s.numel() for s in shapes])
        as_dict = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return loss(functional_call(net, {**frozen, **as_dict}, (xx,)), yy)

    theta = torch.cat([p.reshape(-1) for p in selected.values()])
    return f, theta


def exact_hessian(net: torch.nn.Module, loss: Loss, params: Params, x: Any, y: Any) -> torch.Tensor:
    """The Hessian `(P, P)` of the batch loss in the flat parameters `params`."""
    f, theta = flat_loss(net, loss, params, x, y)
    return torch.func.hessian(f)(theta)  # type: ignore[no-any-return]


def per_sample_grads(
    net: torch.nn.Module,
    loss: Loss,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    loop: bool = False,
) -> torch.Tensor:
    """The per-sample gradients `(n, P)` of the loss of each point alone, vectorised with
    `vmap`, or with `loop` one `torch.func.grad` per point (for layers `vmap` cannot map,
    such as the recurrent ones)."""
    f, theta = flat_loss(net, loss, params, x, y)

    def single(t: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return f(t, xi[None], yi[None])

    if loop:
        return torch.stack([grad(single)(theta, x[i], y[i]) for i in range(x.shape[0])])
    return vmap(grad(single), in_dims=(None, 0, 0))(theta, x, y)  # type: ignore[no-any-return]


def exact_fisher(
    net: torch.nn.Module, loss: Loss, params: Params, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    r"""The empirical Fisher $\frac{1}{n} \sum_i g_i g_i^\top$ `(P, P)`."""
    g = per_sample_grads(net, loss, params, x, y)
    return g.T @ g / g.shape[0]


def explicit_influences(
    net: torch.nn.Module,
    loss: Loss,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    lam: float,
    loop: bool = False,
) -> torch.Tensor:
    r"""$I_{ij} = g'^\top_i (H + \lambda I)^{-1} g_j$ `(n_test, n)`, with the Hessian of the mean
    loss over `(x, y)` inverted explicitly (`loop`: see [per_sample_grads][])."""
    h = exact_hessian(net, loss, params, x, y)
    inverse = torch.linalg.inv(h + lam * torch.eye(h.shape[0], dtype=h.dtype))
    g_train = per_sample_grads(net, loss, params, x, y, loop)
    g_test = per_sample_grads(net, loss, params, x_test, y_test, loop)
    return g_test @ inverse @ g_train.T
