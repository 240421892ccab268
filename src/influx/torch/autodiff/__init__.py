r"""Derivatives of the loss with `torch.func`: evaluating the user's module without touching it,
calling conventions, per-sample gradients, mixed derivatives and Hessian-vector products.
"""
