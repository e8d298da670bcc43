"""The catalog stage: every source's raw manifest checked row by row against the image store (``build``)."""
