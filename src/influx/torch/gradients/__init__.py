r"""Gradients: per-sample gradients of a block of parameters, and how an operator pairs them
(bilinear forms).
"""
