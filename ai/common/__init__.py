"""Shared SDXL plumbing: config, models, data, numerics, checkpoints, logging (torch imported lazily)."""
