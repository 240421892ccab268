r"""Curvature operators: the operator base and its fitted state, what one batch contributes
(batch operations), the Hessian, Gauss-Newton and generalized Gauss-Newton operators.
"""
