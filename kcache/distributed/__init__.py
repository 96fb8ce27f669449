"""Tensor parallelism's low-level part: the process group and its collectives (comm). How a model's weights split
over ranks is the model's business: kcache.models.sharding."""
