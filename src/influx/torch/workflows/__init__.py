r"""Workflows over a fitted model: data valuation (ranking, top-k) and the store of projected
training gradients.
"""
