"""Data layer: the store schema, the store reader, splits, the set sampler and the loader."""
