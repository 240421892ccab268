r"""Composition: a block is gradients x curvature x inverse method; the specifications of a
curvature and of a solver, the composable influence model, its checks and its fit files.
"""
