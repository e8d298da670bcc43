"""The GEOPAK model in plain PyTorch (encoders, fusion, heads, losses, training, inference). No Dagster imports."""
