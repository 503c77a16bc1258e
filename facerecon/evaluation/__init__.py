"""Evaluation protocols: geometry metrics, alignment and dataset readers (see shared protocol notes)."""
