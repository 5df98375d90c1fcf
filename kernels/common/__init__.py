"""Pieces shared by the ops of `lmstack_kernels`; each op's folder keeps only its own math."""
