r"""Kronecker-factored curvature (K-FAC, EK-FAC): the layers it covers, its factors, its operators,
a preconditioner built from it and the scoring of training points through layer signals.
"""
