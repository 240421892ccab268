r"""Implementation of the reference API's legacy helpers: tensor-structure helpers, the torch
side of the functional facade (`solve_hvp`) and functional helpers over data loaders. The
pyDVL import paths (`influx.torch.util`, `influx.torch.functional`,
`influx.torch.legacy.inversion_methods`) re-export them.
"""
