"""Accuracy evaluation: retrieval tasks (tasks), their haystack prose (haystack) and fidelity metrics (metrics)."""
