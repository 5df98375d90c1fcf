"""Sequence parallelism: process groups (`groups.py`) and the LASP-2 / LASP-2H communication
(`sequence.py`). It composes each mixer's (initial state → final state) contract with one AllGather
per layer; it never re-implements a mixer's math. See docs/sequence_parallel.md."""

from lmstack.parallel.groups import ParallelLayout, build_layout
from lmstack.parallel.sequence import SequenceParallel, apply_transition

__all__ = ["ParallelLayout", "SequenceParallel", "apply_transition", "build_layout"]
