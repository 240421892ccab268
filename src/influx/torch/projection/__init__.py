r"""Random projections of per-sample gradients and the curvature in the projected space."""
