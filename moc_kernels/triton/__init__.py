"""Triton kernels, one module per op (kernels, launchers, autograd.Function, custom_op).

``moc_kernels.backend`` imports them (after switching Triton to its interpreter when there is no GPU:
Triton decides that when a kernel is decorated); get one with ``backend.kernel_module(op)``.
"""
