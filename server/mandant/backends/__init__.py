"""Execution backends: in-process PyTorch and NVIDIA Triton, behind one Protocol."""
