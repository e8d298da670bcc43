"""Near-duplicate groups from perceptual hashes: pairs within a Hamming threshold, grouped with union-find.

Why a 256-bit pHash (16 x 16 DCT block) and not the common 64-bit one: on the sample world, whose renderings
share a layout (sky over ground), 64-bit pHashes of *different* images come within 4 bits of each other while
resized + re-compressed copies differ by up to 2, so no threshold separates them; with 256 bits (from the 256-px
analysis image) copies differ by at most 12 bits and different images by at least 36 (five sample worlds, 9,100
images of 160 and 256 px), so the default threshold of 24 sits between the two.

Pairs are found by brute force in blocks (XOR + popcount on four uint64 words per hash): O(N^2) but vectorised,
about 1.4 s for 10k images on the 2-core dev machine (``bench/bench_filters.py``), so ~2 min for 100k; transitive
chains (A~B, B~C) form one group. The best copy of a group is kept:
largest pixel count, then sharpest, then the smallest image_id (so the choice is deterministic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HASH_WORDS = 4  # 256 bits


def hash_matrix(hex_hashes: Sequence[str]) -> np.ndarray:
    """(N, 4) uint64 words from 64-hex-digit hashes."""
    if not len(hex_hashes):
        return np.zeros((0, HASH_WORDS), dtype=np.uint64)
    raw = b"".join(bytes.fromhex(h) for h in hex_hashes)
    words = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    if words.size != len(hex_hashes) * HASH_WORDS:
        raise ValueError("every hash must have 256 bits (64 hex digits)")
    return words.reshape(len(hex_hashes), HASH_WORDS)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between rows of ``a`` (M, 4) and ``b`` (N, 4): an (M, N) uint16 array.
    One word at a time, so the temporaries stay (M, N) instead of (M, N, 4)."""
    d = np.zeros((len(a), len(b)), dtype=np.uint16)
    for w in range(a.shape[1]):
        d += np.bitwise_count(a[:, w, None] ^ b[None, :, w])
    return d


def near_pairs(hashes: np.ndarray, max_distance: int, block: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with distance <= ``max_distance``: (i, j, distance) arrays."""
    n = len(hashes)
    out_i, out_j, out_d = [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        d = hamming(hashes[start:stop], hashes[start:])  # only the upper triangle from this block on
        ii, jj = np.nonzero(d <= max_distance)
        keep = jj > ii  # jj is offset by ``start`` like ii: j > i in global terms too
        out_i.append(ii[keep] + start)
        out_j.append(jj[keep] + start)
        out_d.append(d[ii[keep], jj[keep]].astype(np.int32))
    if not out_i:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.int32)
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return int(x)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


@dataclass(frozen=True)
class DuplicateGroups:
    """Per input row: ``kept_index`` (row index of its group's kept copy; itself when kept or ungrouped),
    ``group_size`` (1 for images with no near duplicate) and ``distance`` (Hamming distance to the kept copy)."""

    kept_index: np.ndarray
    group_size: np.ndarray
    distance: np.ndarray

    @property
    def rejected(self) -> np.ndarray:
        return self.kept_index != np.arange(len(self.kept_index))


def group_near_duplicates(
    image_ids: Sequence[str],
    hex_hashes: Sequence[str],
    pixels: Sequence[int],
    sharpness: Sequence[float],
    max_distance: int,
) -> DuplicateGroups:
    """Group rows whose hashes chain within ``max_distance``; keep the largest, then sharpest copy of each group."""
    n = len(image_ids)
    hashes = hash_matrix(list(hex_hashes))
    ii, jj, _ = near_pairs(hashes, max_distance)
    uf = UnionFind(n)
    for a, b in zip(ii.tolist(), jj.tolist()):
        uf.union(a, b)
    roots = uf.roots() if n else np.zeros(0, np.int64)
    pixels = np.asarray(pixels, dtype=np.int64)
    sharp = np.nan_to_num(np.asarray(sharpness, dtype=np.float64), nan=-1.0)
    ids = np.asarray(image_ids, dtype=object)
    # best first: most pixels, then sharpest, then smallest image_id
    order = sorted(range(n), key=lambda k: (-pixels[k], -sharp[k], ids[k]))
    kept_of_root: dict[int, int] = {}
    for k in order:
        kept_of_root.setdefault(int(roots[k]), k)
    kept = np.array([kept_of_root[int(r)] for r in roots], dtype=np.int64)
    sizes = np.bincount(roots, minlength=n)[roots] if n else np.zeros(0, np.int64)
    dist = (
        np.bitwise_count(hashes ^ hashes[kept]).sum(axis=1, dtype=np.int32) if n else np.zeros(0, np.int32)
    )
    return DuplicateGroups(kept, sizes.astype(np.int64), dist)


@dataclass(frozen=True)
class CopyFacts:
    """What a near-duplicate rejection says about one copy: who it is and why it lost or won."""

    source: str
    source_id: str
    width: int
    height: int
    sharpness: float


def near_duplicate_detail(kept: CopyFacts, this: CopyFacts, group_size: int, distance: int) -> str:
    """Name the kept copy by its source and source_id, the names a curator can look up (not a content hash)."""
    return (
        f"near duplicate of {kept.source}:{kept.source_id} (kept: {kept.width}x{kept.height}, sharpness "
        f"{kept.sharpness:.1f}; this: {this.width}x{this.height}, sharpness {this.sharpness:.1f}); "
        f"pHash distance {distance}/256, group of {group_size}"
    )
