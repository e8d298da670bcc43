"""Geocells and leakage-free splits: plain Python (no Dagster); the assets in ``pipeline.defs.geocells`` call it."""
