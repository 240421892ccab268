r"""The three parts of a block: gradients × curvature × inverse method.

An influence model splits the model's parameters into blocks; for each block it needs

* a **curvature** $C_b$ ([Curvature][influx.torch.composition.curvatures.Curvature]): the Hessian, the
  empirical Fisher (`GAUSS_NEWTON`), the generalized Gauss-Newton matrix $J^\top H_{out} J$, or
  a Kronecker factorisation (K-FAC / EK-FAC) of the empirical Fisher;
* an **inverse method** ([Solver][influx.torch.composition.solvers.Solver]) that turns $C_b$ and
  $\lambda_b$ into an operator $A_b \approx (C_b + \lambda_b I)^{-1}$: a direct solve, CG with
  any preconditioner, LiSSA, a low-rank approximation (Lanczos / Nyström), the inverse harmonic
  mean, or the exact inverse of a factored curvature;
* the block's per-sample **gradients**
  ([TorchGradientProvider][influx.torch.gradients.provider.TorchGradientProvider]).

Any valid pair of curvature and solver composes: CG on the generalized Gauss-Newton, Lanczos on
the EK-FAC curvature, ... A pair that cannot work (LiSSA without mini-batches, the inverse
harmonic mean of anything but the empirical Fisher, the factored inverse of an unfactored
curvature) raises a `TypeError` naming both when the model is fitted.

The modules: [curvatures][influx.torch.composition.curvatures] and
[solvers][influx.torch.composition.solvers] (the specifications),
[composable][influx.torch.composition.composable] (the influence model made of blocks),
[fit_checks][influx.torch.composition.fit_checks] (the checks of `fit`) and
[persistence][influx.torch.composition.persistence] (fit files).
"""
