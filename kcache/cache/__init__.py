"""Caches: FullKV and KCache over device and host block pools."""
