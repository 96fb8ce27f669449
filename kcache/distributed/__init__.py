"""Tensor parallelism's low-level parts: how weights split over ranks (sharding) and the process group (comm)."""
