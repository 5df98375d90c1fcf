"""Pieces shared by several ops: the chunk layout and state scan of the chunked PyTorch paths
(`chunked.py`), input checks (`checks.py`), Triton helpers (`triton_utils.py`) and the sm_90
compile check (`compile_check.py`). Each op's own math stays in its folder."""
