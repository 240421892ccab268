r"""Data: batches of tensors or structures, tasks, parameter blocks, the checks of user input
and the torch-side converters of the calculators.
"""
