"""Shared SDXL plumbing of the training and generation recipes: models, data, numerics, caches, checkpoints, logging,
the shared config sections (torch imported lazily). Project-wide plumbing (cli, io, the config loader) is in core/."""
