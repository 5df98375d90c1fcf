"""lmstack's token-mixing ops: one folder per op with the Triton kernels, a naive reference recurrence,
a chunked PyTorch path and a short math note."""
