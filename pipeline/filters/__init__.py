"""The filtering stage's domain code (plain Python, no Dagster): decode and measure every image once, then keep it
or reject it with one reason code from ``pipeline.core.reasons``.

- ``decode``: safe opening (pixel limit, allowed formats), draft-mode decoding, EXIF orientation, mode handling;
- ``metrics``: the one-pass per-image metrics, computed in worker processes and cached by ``image_id``;
- ``dedup``: perceptual-hash near-duplicate groups (union-find), keeping the best copy;
- ``geotag`` and ``licenses``: checks on catalog columns only;
- ``indoor``: zero-shot CLIP indoor/outdoor, evaluated only when real pretrained weights are available;
- ``examples``: contact sheets of rejected images for people;
- ``stage``: the whole stage as one function, ``filter_catalog``.
"""
