r"""The arithmetic of one Kronecker-factored layer on its recorded signals: scores of training
points against test factors, by contraction where that is cheaper than forming the per-sample
gradients $\sum_t \delta_t \tilde a_t^\top$, and the rotation of those gradients into a
Kronecker eigenbasis by the cheaper order."""

from __future__ import annotations

import torch

__all__ = ["layer_scores", "rotated_gradients", "uses_contraction"]


def uses_contraction(n_factors: int, positions: int, out_dim: int, in_dim: int) -> bool:
    r"""Whether to score a layer by contracting the test factors with $\tilde a$ and $\delta$
    rather than forming the per-sample gradients.

    Per training point, with $q$ test factors $V_i$ `(m, k)` and $T$ positions, forming the
    gradient $\sum_t \delta_t \tilde a_t^\top$ and taking $q$ inner products costs
    $mk(T + q)$ multiply-adds and $mk$ numbers of memory; the contraction
    $\sum_t \delta_t^\top V_i \tilde a_t$ costs $qTmk + qT\min(m, k)$ multiply-adds and
    $2qT\min(m, k)$ numbers (the products $V_i \tilde a_t$ or $V_i^\top \delta_t$ and their
    pairing). The contraction is chosen when it needs less memory for at most a quarter more
    arithmetic: layers with one position and $mk$ large against $q \min(m, k)$.
    """
    small = min(out_dim, in_dim)
    form_flops = out_dim * in_dim * (positions + n_factors)
    contract_flops = n_factors * positions * (out_dim * in_dim + small)
    return 2 * n_factors * positions * small < out_dim * in_dim and (
        contract_flops <= 1.25 * form_flops
    )


def layer_scores(
    factors: torch.Tensor, inputs: torch.Tensor, output_grads: torch.Tensor
) -> torch.Tensor:
    r"""$s_{ij} = \sum_t \delta_{jt}^\top V_i \tilde a_{jt}$ for one layer.

    Args:
        factors: $V$ `(q, m, k)`.
        inputs: $\tilde a$ `(n, T, k)`.
        output_grads: $\delta$ `(n, T, m)`.

    Returns:
        the scores `(q, n)`.
    """
    q, m, k = factors.shape
    n, positions = inputs.shape[0], inputs.shape[1]
    if not uses_contraction(q, positions, m, k):
        grads = torch.einsum("ntm,ntk->nmk", output_grads, inputs)
        return factors.reshape(q, -1) @ grads.reshape(n, -1).T
    if m <= k:  # V_i a_t: (n, T, q, m), paired with delta_t
        rotated = inputs.reshape(n * positions, k) @ factors.reshape(q * m, k).T
        return torch.einsum("ntqm,ntm->qn", rotated.reshape(n, positions, q, m), output_grads)
    rotated = output_grads.reshape(n * positions, m) @ factors.transpose(1, 2).reshape(q * k, m).T
    return torch.einsum("ntqk,ntk->qn", rotated.reshape(n, positions, q, k), inputs)


def rotated_gradients(
    inputs: torch.Tensor, output_grads: torch.Tensor, qa: torch.Tensor, qg: torch.Tensor
) -> torch.Tensor:
    r"""The per-sample gradients $V_i = \sum_t \delta_{it} \tilde a_{it}^\top$ of a layer in
    the Kronecker eigenbasis, $Q_G^\top V_i Q_A$, by the cheaper of two orders.

    Rotating the signals, $\sum_t (Q_G^\top \delta_{it})(Q_A^\top \tilde a_{it})^\top$, costs
    $T(m^2 + k^2 + mk)$ multiply-adds per sample for $T$ positions; forming $V_i$ and rotating
    it costs $Tmk + m^2k + mk^2$. The first wins for few positions and wide inputs (the last
    convolutions of a ResNet: over 30 times cheaper), the second for many positions and
    narrow inputs (its first convolutions: about 6 times cheaper). Both give the same values
    up to rounding.

    Args:
        inputs: $\tilde a$ `(N, T, k)`.
        output_grads: $\delta$ `(N, T, m)`, same dtype.
        qa: $Q_A$ `(k, k)`, same dtype.
        qg: $Q_G$ `(m, m)`, same dtype.

    Returns:
        `(N, m, k)`.
    """
    positions, k, m = inputs.shape[1], inputs.shape[2], output_grads.shape[2]
    if positions * (m * m + k * k + m * k) <= positions * m * k + m * m * k + m * k * k:
        return torch.einsum("ntm,ntk->nmk", output_grads @ qg, inputs @ qa)
    grads = torch.einsum("ntm,ntk->nmk", output_grads, inputs)
    return (qg.T @ grads) @ qa
