"""Tensor parallelism: how weights split over ranks (sharding), the process group (comm), the worker processes (worker)."""
