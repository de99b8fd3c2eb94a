"""Triton kernels, one module per op (kernels, launchers, autograd.Function, custom_op).

Import these modules only through ``moc_kernels.backend.kernel_module``: it switches Triton to its
interpreter first when there is no GPU (Triton decides that when a kernel is decorated).
"""
