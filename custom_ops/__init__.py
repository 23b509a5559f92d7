"""Triton kernels and their torch.library registrations."""
