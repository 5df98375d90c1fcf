"""Pieces shared by the ops (each op's folder keeps only its own math): the chunk layout and state
scan of the chunked PyTorch paths (`chunked.py`), input checks (`checks.py`), the sequence bounds and
start states of the naive recurrences (`naive.py`), Triton helpers (`triton_utils.py`), the
kernel resource check (`compile_check.py`) and `disable_compile` (`compiler.py`)."""
