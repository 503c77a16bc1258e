"""Batch stages (detect, fit, ...): thin orchestration over the library modules."""
