"""Pieces shared by the ops (each op's folder keeps only its own math)."""
