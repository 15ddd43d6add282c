"""Triton kernels: the second GPU path; under TRITON_INTERPRET=1 they run on CPU tensors."""
