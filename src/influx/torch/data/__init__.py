r"""Data: batches of tensors or structures, tasks, parameter blocks, the checks of user input,
the state protocol of fitted objects and the torch-side converters of the calculators.
"""
