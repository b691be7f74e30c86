"""Triton kernels and their autograd glue."""
