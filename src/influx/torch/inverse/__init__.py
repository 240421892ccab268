r"""Inverse methods: operators that apply $(C + \lambda I)^{-1}$ (direct, conjugate gradient,
LiSSA, low rank, inverse harmonic mean) and the preconditioners of conjugate gradient.
"""
