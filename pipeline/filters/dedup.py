"""Near-duplicate groups from perceptual hashes: every pair within a Hamming threshold, grouped into components.

Why a 256-bit pHash (16 x 16 DCT block) and not the common 64-bit one: on the sample world, whose renderings
share a layout (sky over ground), 64-bit pHashes of *different* images come within 4 bits of each other while
resized + re-compressed copies differ by up to 2, so no threshold separates them; with 256 bits (from the 256-px
analysis image) copies differ by at most 12 bits and different images by at least 36 (five sample worlds, 9,100
images of 160 and 256 px), so the default threshold of 24 sits between the two.

How pairs are found without comparing all of them (exact: nothing within the threshold is missed):

1. Identical hashes are collapsed first (one representative per distinct hash, the others its members), so a
   million blank images make one entry, not a bucket of a million.
2. Multi-index hashing (Norouzi, Punjani & Fleet, "Fast Search in Hamming Space with Multi-Index Hashing",
   CVPR 2012; TPAMI 2014): the 256 bits are cut into ``t`` disjoint parts. If two hashes differ in at most
   ``r = t*q + a`` bits (0 <= a < t), then one of the first ``a+1`` parts differs in at most ``q`` bits or one
   of the others in at most ``q-1`` (pigeonhole; TPAMI 2014, Proposition 1), so it suffices to find, part by
   part, the pairs whose part differs in at most that radius.
3. Those per-part radius searches use covering keys (Pagh, "CoveringLSH: Locality-sensitive Hashing without
   False Negatives", SODA 2016) instead of enumerating Hamming balls: each bit of a part gets a nonzero vector
   ``m(i)`` in GF(2)^(q+1); for every nonzero ``v`` the key keeps the bits with ``<m(i), v> = 1``. At most
   ``q`` differing bits span at most ``q`` dimensions, so some ``v`` is orthogonal to all of them and that key
   ignores every differing bit: the pair lands in one bucket of exact key matches. With ``q = 0`` this is plain
   exact-substring MIH. Buckets are found with a bincount pre-filter and a sort of the few colliding keys, pairs
   inside a bucket are emitted a step at a time and verified with the full popcount, so memory stays
   O(n + pairs) and time grows with the candidates, not with n^2.

Why not exact-substring MIH alone: at r = 24 it needs 25 parts of ~10 bits, and two random hashes share one of
them with probability 25/1024 -- still 2.4 % of all pairs (1.2e12 checks at 10 M). Why not FAISS's binary
indexes: ``faiss-cpu`` is not a dependency here, its exact range search is the flat (quadratic) index, and
``IndexBinaryMultiHash`` is exact only if its bit flips cover the radius, which at r = 24 is the same
explosion. ``plan_parts`` picks ``t`` from the expected candidate count; for tiny inputs brute force is
cheaper and is used (both are exact, ``near_pairs(method=...)`` forces one). The sample world's groups are
identical either way (tests/test_dedup_scale.py checks MIH against brute force).

Groups mean "near duplicate of the kept copy": the best photo (largest pixel count, then sharpest, then the
smallest image_id, so the choice is deterministic) is kept, every photo within the threshold of it is rejected
naming it, and the best photo left starts the next group. A chain A~B~C whose ends are farther apart than the
threshold therefore keeps A and C when A is the best, instead of rejecting C as a "duplicate" of A.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix

HASH_WORDS = 4  # 256 bits
HASH_BITS = 64 * HASH_WORDS
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # multiplicative hashing constant (2^64 / phi)
# relative costs for plan_parts, rounded from timings on the 2-core dev machine (bench/scale_dedup.py): one key
# pass per representative (mask, mix, bincount, sort of the colliding), one verified candidate, one brute-force pair
_COST_KEY, _COST_CANDIDATE, _COST_BRUTE = 4.0, 4.0, 1.0
_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32))


def hash_matrix(hex_hashes: Sequence[str]) -> np.ndarray:
    """(N, 4) uint64 words from 64-hex-digit hashes (word 0 = the first 16 digits)."""
    if not len(hex_hashes):
        return np.zeros((0, HASH_WORDS), dtype=np.uint64)
    if any(len(h) != 2 * 8 * HASH_WORDS for h in hex_hashes):
        raise ValueError("every hash must have 256 bits (64 hex digits)")
    raw = bytes.fromhex("".join(hex_hashes))  # one C call; raises ValueError on a non-hex digit
    if len(raw) != len(hex_hashes) * 8 * HASH_WORDS:  # fromhex skips whitespace
        raise ValueError("every hash must have 256 bits (64 hex digits)")
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(len(hex_hashes), HASH_WORDS)


_DECODE_ROWS = 1 << 18  # hashes decoded at a time from hex text (16 MB of text)
_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _digit, _value in zip(b"0123456789abcdefABCDEF", list(range(16)) + list(range(10, 16))):
    _HEX_VALUE[_digit] = _value


def hash_words(hashes: "np.ndarray | pa.Array | pa.ChunkedArray | Sequence[str]") -> np.ndarray:
    """(N, 4) uint64 words of 256-bit hashes given as an (N, 4) uint64 array (returned as is), a pyarrow string
    column of 64-hex-digit hashes (as the filter's Parquet holds them: decoded from its buffers, no Python string
    per row, so 10 M hashes cost their 320 MB of words and not 3 GB of str objects), or a sequence of hex str."""
    if isinstance(hashes, np.ndarray) and hashes.ndim == 2:
        if hashes.shape[1] != HASH_WORDS or hashes.dtype != np.uint64:
            raise ValueError(f"hash words must be an (N, {HASH_WORDS}) uint64 array, got {hashes.dtype}{hashes.shape}")
        return hashes
    if isinstance(hashes, pa.ChunkedArray):
        parts = [hash_words(c) for c in hashes.chunks]
        return np.concatenate(parts) if parts else np.zeros((0, HASH_WORDS), dtype=np.uint64)
    if isinstance(hashes, pa.Array):
        return _words_from_arrow(hashes)
    return hash_matrix(list(hashes))


def _words_from_arrow(column: pa.Array) -> np.ndarray:
    n, digits = len(column), 16 * HASH_WORDS
    if column.null_count:
        raise ValueError(f"{column.null_count} hashes are missing")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ValueError(f"hashes must be strings, got {column.type}")
    # offsets read in the column's own width: a cast to large_string would copy all 640 MB of text at 10 M rows
    offset_type = np.int64 if pa.types.is_large_string(column.type) else np.int32
    offsets_buf, data_buf = column.buffers()[1], column.buffers()[2]
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[column.offset: column.offset + n + 1]
    if n and not np.all(np.diff(offsets) == digits):
        raise ValueError("every hash must have 256 bits (64 hex digits)")
    if not n:
        return np.zeros((0, HASH_WORDS), dtype=np.uint64)
    text = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0]: offsets[-1]].reshape(n, digits)
    out = np.empty((n, HASH_WORDS), dtype=np.uint64)
    for lo in range(0, n, _DECODE_ROWS):  # in chunks: whole-column nibble arrays took ~2 GB at 10 M rows
        nibbles = _HEX_VALUE[text[lo:lo + _DECODE_ROWS]]
        if (nibbles == 255).any():
            raise ValueError("hashes must be hexadecimal")
        packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # (rows, 32) bytes, big-endian per word (hash_matrix)
        out[lo:lo + _DECODE_ROWS] = np.ascontiguousarray(packed).view(">u8")
    return out


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` by sorting: NumPy 2.4's plain ``np.unique`` hashes and took 23.6 s for 8 M distinct
    int64 pair codes where a sort takes 0.13 s (measured here)."""
    out = np.sort(values)
    if len(out) > 1:
        out = out[np.r_[True, out[1:] != out[:-1]]]
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between rows of ``a`` (M, 4) and ``b`` (N, 4): an (M, N) uint16 array.
    One word at a time, so the temporaries stay (M, N) instead of (M, N, 4)."""
    d = np.zeros((len(a), len(b)), dtype=np.uint16)
    for w in range(a.shape[1]):
        d += np.bitwise_count(a[:, w, None] ^ b[None, :, w])
    return d


def row_distance(hashes: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Hamming distance between rows ``i[k]`` and ``j[k]`` of ``hashes``, one word at a time (int32)."""
    d = np.zeros(len(i), dtype=np.int32)
    for w in range(hashes.shape[1]):
        col = hashes[:, w]
        d += np.bitwise_count(col[i] ^ col[j])
    return d


def _within(hashes: np.ndarray, i: np.ndarray, j: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (i[k], j[k]) within ``max_distance``, adding one word at a time and dropping a pair as soon as
    it is over: most candidates are random pairs (~32 bits apart per word), gone after the first word."""
    d = np.zeros(len(i), dtype=np.int32)
    for w in range(hashes.shape[1]):
        col = hashes[:, w]
        d += np.bitwise_count(col[i] ^ col[j])
        ok = d <= max_distance
        if not ok.all():
            i, j, d = i[ok], j[ok], d[ok]
    return i, j


def brute_force_pairs(hashes: np.ndarray, max_distance: int, block: int = 256) -> tuple[np.ndarray, ...]:
    """All pairs i < j within ``max_distance`` by comparing every pair in blocks: O(N^2), the reference."""
    n = len(hashes)
    out_i, out_j, out_d = [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        d = hamming(hashes[start:stop], hashes[start:])  # only the upper triangle from this block on
        ii, jj = np.nonzero(d <= max_distance)
        keep = jj > ii  # jj is offset by ``start`` like ii: j > i in global terms too
        out_i.append(ii[keep].astype(np.int64) + start)
        out_j.append(jj[keep].astype(np.int64) + start)
        out_d.append(d[ii[keep], jj[keep]].astype(np.int32))
    if not out_i:
        return _EMPTY
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)


# ---------------------------------------------------------------------------------------------- identical hashes


def collapse_identical(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rep_of, reps)``: each row's representative (the smallest row index with the same hash) and the sorted
    representatives. A bincount pre-filter on a mix of the words leaves only rows that may repeat for the sort."""
    n = len(hashes)
    rep_of = np.arange(n, dtype=np.int64)
    if n < 2:
        return rep_of, rep_of.copy()
    mix = hashes[:, 0].copy()
    for w in range(1, hashes.shape[1]):
        mix ^= hashes[:, w] * (_GOLDEN + np.uint64(2 * w))
    maybe = _colliding(mix * _GOLDEN)
    if len(maybe):
        cols = hashes[maybe]
        order = np.lexsort([maybe] + [cols[:, w] for w in range(cols.shape[1] - 1, -1, -1)])
        rows, cols = maybe[order], cols[order]
        new = np.ones(len(rows), dtype=bool)
        new[1:] = np.any(cols[1:] != cols[:-1], axis=1)
        first = rows[new]  # rows ascend inside a run (row index is the least significant key): first = smallest
        rep_of[rows] = first[np.cumsum(new) - 1]
    return rep_of, np.flatnonzero(rep_of == np.arange(n))


def _colliding(mixed: np.ndarray) -> np.ndarray:
    """Indices of ``mixed`` (well-mixed uint64 keys) whose bucket of the top bits holds at least two keys: a
    superset of the repeated keys, and far smaller than ``mixed`` when few repeat."""
    bits = int(min(26, max(8, math.ceil(math.log2(max(len(mixed), 2))) + 1)))
    bucket = (mixed >> np.uint64(64 - bits)).view(np.int64)  # < 2^26: the same values, no second copy
    return np.flatnonzero(_bucket_sizes(bucket, bits) >= 2)


_COUNT_BITS = 23  # buckets counted at a time: 64 MB of counts, not 256 MB for the 2^25 buckets of 10 M rows


def _bucket_sizes(bucket: np.ndarray, bits: int) -> np.ndarray:
    """Per row, how many rows share its bucket (0 <= ``bucket`` < 2**``bits``), as int32; counted
    2**``_COUNT_BITS`` buckets at a time, so the count array stays small at 10 M rows."""
    out = np.empty(len(bucket), dtype=np.int32)
    if bits <= _COUNT_BITS:
        out[:] = np.bincount(bucket, minlength=1 << bits)[bucket]
        return out
    high = (bucket >> _COUNT_BITS).astype(np.uint8)  # bits <= 26: at most 8 slices
    for r in range(1 << (bits - _COUNT_BITS)):
        rows = np.flatnonzero(high == r)
        low = bucket[rows] & ((1 << _COUNT_BITS) - 1)
        out[rows] = np.bincount(low, minlength=1 << _COUNT_BITS)[low]
    return out


# ---------------------------------------------------------------------------------------------- multi-index hashing


@dataclass(frozen=True)
class Part:
    """Bits ``[start, start + length)`` of the 256 (bit 0 = the lowest bit of word 0) searched within ``radius``
    bits through exact matches of ``masks`` (the covering keys)."""

    start: int
    length: int
    radius: int
    masks: tuple[int, ...]


def covering_masks(length: int, radius: int) -> tuple[int, ...]:
    """Pagh's covering keys on ``length`` bits: every set of at most ``radius`` bits is missed by one mask."""
    dim = radius + 1
    nonzero = (1 << dim) - 1
    if length >= nonzero:  # every nonzero vector of GF(2)^dim equally often: each key keeps ~half the bits
        vectors = [(i % nonzero) + 1 for i in range(length)]
    else:  # fewer bits than vectors: distinct ones in a fixed scrambled order, so no key keeps only a few bits
        vectors = (np.random.default_rng(dim).permutation(nonzero)[:length] + 1).tolist()
    masks = []
    for v in range(1, 1 << dim):
        masks.append(sum(1 << i for i, m in enumerate(vectors) if (m & v).bit_count() % 2))
    return tuple(masks)


def make_plan(parts: int, max_distance: int) -> tuple[Part, ...]:
    """MIH with ``parts`` parts of (nearly) equal length and the radii of the refined pigeonhole bound;
    parts whose radius would be negative are not needed and left out."""
    q, a = divmod(max_distance, parts)
    sizes = [HASH_BITS // parts + (1 if k < HASH_BITS % parts else 0) for k in range(parts)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    radii = [q if k <= a else q - 1 for k in range(parts)]
    return tuple(Part(s, ln, r, covering_masks(ln, r)) for s, ln, r in zip(starts, sizes, radii) if r >= 0)


def plan_cost(plan: Sequence[Part], n: int) -> float:
    """Expected cost of ``plan`` on ``n`` hashes with independent uniform bits: one pass per key, plus the
    candidates (pairs sharing a key of b bits: n^2/2 * 2^-b)."""
    pairs = n * (n - 1) / 2
    return sum(_COST_KEY * n + _COST_CANDIDATE * pairs * 2.0 ** -m.bit_count() for p in plan for m in p.masks)


def plan_parts(n: int, max_distance: int, allow_brute: bool = True) -> tuple[Part, ...] | None:
    """The cheapest exact MIH plan for ``n`` distinct hashes under ``plan_cost``, or ``None`` when brute force is
    expected to be cheaper (tiny ``n``, or a threshold so large that keys stop being selective)."""
    best = None
    best_cost = _COST_BRUTE * n * (n - 1) / 2 if allow_brute else math.inf
    for t in range(4, min(64, max(4, max_distance + 1)) + 1):  # a part fits one word; > r+1 parts is waste
        if max_distance // t >= 8:  # 2^9 keys per part and more: never cheaper than a smaller radius
            continue
        plan = make_plan(t, max_distance)
        cost = plan_cost(plan, n)
        if cost < best_cost:
            best, best_cost = plan, cost
    return best


def part_values(hashes: np.ndarray, start: int, length: int) -> np.ndarray:
    """Bits ``[start, start + length)`` of every hash as one uint64 (``length`` <= 64; bit 0 of the result is
    bit ``start``); a part may straddle two words."""
    w, off = divmod(start, 64)
    val = hashes[:, w] >> np.uint64(off)
    if off + length > 64:
        val = val | (hashes[:, w + 1] << np.uint64(64 - off))
    if length < 64:
        val = val & np.uint64((1 << length) - 1)
    return val


def _bucket_pairs(keys: np.ndarray, step_limit: int, light: np.ndarray | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every pair (i < j) of positions with equal keys (plus rare pairs whose keys merely share 40 mixed bits;
    the caller verifies every pair anyway), in slices of at most ~``step_limit`` pairs. Pairs come from sorted
    runs one offset at a time (element k with element k+s of its run), so each step is O(elements still in
    long-enough runs) and the total is O(pairs). With ``light`` (a mask over positions), pairs of two
    non-light positions are left out (the caller compares those otherwise): light ones go first in every run and
    only they start a pair, so an overfull bucket costs (light members × bucket), not bucket²."""
    # (``del`` as soon as an array is done with: this generator lives through all its slices, and at 10 M rows
    # each array of the run bookkeeping is 80 MB)
    mixed = keys * _GOLDEN  # odd multiplier: a bijection of uint64, so equal keys <=> equal mixed values
    del keys  # the caller's temporary: only this frame holds it
    rows = _colliding(mixed)
    if len(rows) < 2:
        return
    if light is not None:
        rows = rows[np.argsort(~light[rows], kind="stable")]  # light first; each group stays in row order
    mixed = mixed[rows]
    if len(rows) < 1 << 24:  # sort values, not indices (several times faster): top 40 mixed bits | position
        packed = (mixed & ~np.uint64(0xFFFFFF)) | np.arange(len(rows), dtype=np.uint64)
        del mixed
        packed.sort()
        ks = packed >> np.uint64(24)
        rows = rows[(packed & np.uint64(0xFFFFFF)).astype(np.int64)]
        del packed
    else:
        order = np.argsort(mixed, kind="stable")  # stable: light first inside a run, as above
        rows, ks = rows[order], mixed[order]
        del order, mixed
    start = np.ones(len(ks), dtype=bool)
    start[1:] = ks[1:] != ks[:-1]
    del ks
    run = np.cumsum(start) - 1
    del start
    lengths = np.bincount(run)
    keep = lengths[run] >= 2
    rows, run = rows[keep], run[keep]
    del keep
    head = np.r_[True, run[1:] != run[:-1]]
    pos = np.arange(len(rows)) - np.flatnonzero(head)[np.cumsum(head) - 1]
    del head
    left = lengths[run] - pos - 1  # partners after this element in its run
    del run, pos, lengths
    active = np.arange(len(rows)) if light is None else np.flatnonzero(light[rows])
    s = 1
    while len(active):
        active = active[left[active] >= s]
        for lo in range(0, len(active), step_limit):
            a = active[lo:lo + step_limit]
            i, j = rows[a], rows[a + s]
            yield np.minimum(i, j), np.maximum(i, j)
        s += 1


HEAVY_BUCKET = 256  # a key bucket with more rows than this is "too full": its rows are compared by brute force
HEAVY_ROWS_MAX = 40_000  # at most this many such rows (their brute force is quadratic); fuller buckets first
BALANCE_SAMPLE = 65_536  # rows whose bits measure each bit's balance


def _bits(rows: np.ndarray) -> np.ndarray:
    """(N, 256) uint8 array of the rows' bits; column b is bit b % 64 of word b // 64."""
    return np.unpackbits(np.ascontiguousarray(rows.astype("<u8")).view(np.uint8), axis=1, bitorder="little")


def bit_balance(hashes: np.ndarray, sample: int = BALANCE_SAMPLE) -> np.ndarray:
    """Share of set bits per bit position (256), measured on an evenly spaced sample of rows."""
    rows = hashes[:: max(1, len(hashes) // sample)] if len(hashes) else hashes
    return _bits(rows).mean(axis=0) if len(rows) else np.full(HASH_BITS, 0.5)


def dealt_bit_order(balance: np.ndarray, parts: int) -> np.ndarray:
    """``order[k]``: the original bit that goes to position k when the 256 bits are dealt round-robin to
    ``parts`` contiguous parts, most balanced bits first. Every part gets its share of the informative bits and of
    the constant ones, and bits that sit side by side (a shared prefix, a word that barely varies) land in
    different parts, so no part is a block that many hashes share. Any partition keeps MIH exact: the pigeonhole
    bound holds for disjoint parts of any bits, and Hamming distance does not change when bits are reordered."""
    rank = np.argsort(np.abs(balance - 0.5), kind="stable")  # most balanced first; ties in bit order
    sizes = [HASH_BITS // parts + (1 if k < HASH_BITS % parts else 0) for k in range(parts)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    order = np.empty(HASH_BITS, dtype=np.int64)
    for r, bit in enumerate(rank.tolist()):
        order[starts[r % parts] + r // parts] = bit
    return order


def permute_bits(hashes: np.ndarray, order: np.ndarray, chunk: int = 1 << 16, inplace: bool = False) -> np.ndarray:
    """Rows with bit ``order[k]`` moved to position k (chunked: 256 bytes a row at a time, not 256 × n);
    ``inplace`` rewrites ``hashes`` itself (no second copy of a 10 M-row matrix)."""
    out = hashes if inplace else np.empty_like(hashes)
    for lo in range(0, len(hashes), chunk):
        bits = _bits(hashes[lo:lo + chunk])[:, order]
        packed = np.ascontiguousarray(np.packbits(bits, axis=1, bitorder="little"))
        out[lo:lo + chunk] = packed.view("<u8").astype(np.uint64)
    return out


def heavy_rows(hashes: np.ndarray, plan: Sequence[Part], limit: int = HEAVY_BUCKET,
               max_rows: int = HEAVY_ROWS_MAX) -> np.ndarray:
    """Rows that fall in a key bucket of more than ``limit`` rows under any key of ``plan`` (sorted), at most
    ``max_rows`` of them (the fullest buckets win). A dense cluster (many near-identical photos of one landmark)
    fills the same buckets under every key and would be verified pair by pair once per key; its rows are
    compared once, by brute force among themselves, instead."""
    n = len(hashes)
    bits = int(min(26, max(8, math.ceil(math.log2(max(n, 2))) + 1)))
    fullest = np.zeros(n, dtype=np.int32)  # per row: the fullest bucket it fell in
    for part in plan:
        vals = part_values(hashes, part.start, part.length)
        for mask in part.masks:
            bucket = vals & np.uint64(mask)  # then in place: one 80 MB array at 10 M rows, not four
            bucket *= _GOLDEN
            bucket >>= np.uint64(64 - bits)
            bucket = bucket.view(np.int64)
            np.maximum(fullest, _bucket_sizes(bucket, bits), out=fullest)
    heavy = np.flatnonzero(fullest > limit)
    if len(heavy) > max_rows:
        heavy = np.sort(heavy[np.argsort(-fullest[heavy], kind="stable")[:max_rows]])
    return heavy


def mih_pairs(hashes: np.ndarray, max_distance: int, parts: Sequence[Part] | None = None,
              step_limit: int = 1 << 20, heavy_bucket: int = HEAVY_BUCKET, reorder_in_place: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of rows within ``max_distance`` by multi-index hashing (rows should be distinct hashes;
    identical ones are found too, just less cheaply). Sorted by (i, j).

    Robust to hashes whose bits are not independent and uniform (real pHashes: constant bits, shared prefixes,
    dense clusters): the bits are dealt to the parts by measured balance (``dealt_bit_order``), and rows of
    overfull buckets (``heavy_rows``) are compared among themselves by brute force once, while the keys only
    verify pairs with at least one other row. ``reorder_in_place``: the caller's array may be overwritten with
    its bits reordered (a caller that made ``hashes`` for this call saves a copy)."""
    n = len(hashes)
    if n < 2:
        return _EMPTY
    plan = parts if parts is not None else plan_parts(n, max_distance, allow_brute=False)
    hashes = permute_bits(hashes, dealt_bit_order(bit_balance(hashes), len(plan)), inplace=reorder_in_place)
    heavy = heavy_rows(hashes, plan, heavy_bucket)
    light = np.ones(n, dtype=bool)
    light[heavy] = False
    found: list[np.ndarray] = []
    if len(heavy) >= 2:
        hi, hj, _ = brute_force_pairs(hashes[heavy], max_distance)
        found.append(heavy[hi] * n + heavy[hj])
    for part in plan:
        vals = part_values(hashes, part.start, part.length)
        per_part: list[np.ndarray] = []
        for mask in part.masks:
            for i, j in _bucket_pairs(vals & np.uint64(mask), step_limit, light):
                i, j = _within(hashes, i, j, max_distance)
                per_part.append(i * n + j)
        if per_part:
            found.append(sorted_unique(np.concatenate(per_part)))
    if not found:
        return _EMPTY
    code = sorted_unique(np.concatenate(found))
    i, j = code // n, code % n
    return i, j, row_distance(hashes, i, j)


# ---------------------------------------------------------------------------------------------- public search


def representative_pairs(hashes: np.ndarray, max_distance: int, method: str = "auto", reorder_in_place: bool = False
                         ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(rep_of, (i, j, distance))``: identical hashes collapsed to their representative (``rep_of``), and the
    pairs of distinct representatives (row indices, i < j) within ``max_distance``. Compact: n blank images are
    one representative, not n^2/2 pairs. ``reorder_in_place``: ``hashes`` itself may be overwritten (its first
    rows by the representatives' hashes, bits reordered: distances stay the same) instead of a copy (320 MB at
    10 M)."""
    rep_of, reps, _, (i, j, d) = _representative_search(hashes, max_distance, method, reorder_in_place)
    return rep_of, (reps[i], reps[j], d)


def _representative_search(hashes: np.ndarray, max_distance: int, method: str, in_place: bool
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(rep_of, reps, sub, (i, j, distance))`` with ``sub`` the representatives' hashes (row k: ``reps[k]``,
    bits possibly reordered) and the pairs as positions in it. ``in_place``: ``sub`` is ``hashes`` itself,
    compacted (its first rows overwritten) and reordered, not a 320 MB copy at 10 M rows."""
    if method not in ("auto", "mih", "brute"):
        raise ValueError(f"unknown near-pair method {method!r}: auto, mih or brute")
    if max_distance < 0:
        raise ValueError("max_distance must be >= 0")
    rep_of, reps = collapse_identical(hashes)
    sub = _compact_rows(hashes, reps) if in_place else hashes[reps]
    plan = plan_parts(len(reps), max_distance) if method == "auto" else None
    if method == "brute" or (method == "auto" and plan is None):
        pairs = brute_force_pairs(sub, max_distance)
    else:
        pairs = mih_pairs(sub, max_distance, plan, reorder_in_place=True)  # a copy, or the caller allowed it
    return rep_of, reps, sub, pairs


def _compact_rows(hashes: np.ndarray, reps: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """``hashes[reps]`` written over the first rows of ``hashes`` (a view of them), a chunk at a time: ``reps``
    ascends and ``reps[k] >= k``, so no row is overwritten before it is read."""
    if len(reps) == len(hashes):
        return hashes
    for lo in range(0, len(reps), chunk):
        src = reps[lo:lo + chunk]
        hashes[lo:lo + len(src)] = hashes[src]
    return hashes[:len(reps)]


def near_pairs(hashes: np.ndarray, max_distance: int, block: int = 256, method: str = "auto"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with distance <= ``max_distance``: (i, j, distance) arrays sorted by (i, j). Exact for
    every ``method`` ("brute" compares all pairs in blocks of ``block`` rows)."""
    if method == "brute" or len(hashes) < 2:
        return brute_force_pairs(hashes, max_distance, block)
    rep_of, (ri, rj, rd) = representative_pairs(hashes, max_distance, method)
    n = len(hashes)
    members = np.argsort(rep_of, kind="stable")  # rows grouped by representative, ascending inside a group
    count = np.bincount(rep_of, minlength=n)
    first = np.cumsum(count) - count  # where each representative's members start in ``members``
    out_i, out_j, out_d = [], [], []
    # identical copies: every pair inside a group of members, distance 0
    multi, s = np.flatnonzero(count >= 2), 1
    while len(multi):  # offset s: the k-th member with the (k+s)-th
        lo = np.repeat(first[multi], count[multi] - s) + _ramp(count[multi] - s)
        out_i.append(members[lo])
        out_j.append(members[lo + s])
        out_d.append(np.zeros(len(lo), np.int32))
        s += 1
        multi = multi[count[multi] > s]
    # near pairs of representatives: every member of one with every member of the other
    reps_pairs = count[ri] * count[rj]
    pair_of = np.repeat(np.arange(len(ri)), reps_pairs)
    k = _ramp(reps_pairs)
    out_i.append(members[first[ri][pair_of] + k // count[rj][pair_of]])
    out_j.append(members[first[rj][pair_of] + k % count[rj][pair_of]])
    out_d.append(rd[pair_of].astype(np.int32))
    i, j, d = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)
    i, j = np.minimum(i, j), np.maximum(i, j)
    order = np.lexsort((j, i))
    return i[order].astype(np.int64), j[order].astype(np.int64), d[order]


def _ramp(counts: np.ndarray) -> np.ndarray:
    """0..c-1 for each c in ``counts``, concatenated."""
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.int64)
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


# ---------------------------------------------------------------------------------------------- groups


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
    hex_hashes: "np.ndarray | pa.Array | pa.ChunkedArray | Sequence[str]",
    pixels: Sequence[int],
    sharpness: Sequence[float],
    max_distance: int,
    method: str = "auto",
    words_owned: bool = False,
) -> DuplicateGroups:
    """Keep the best copy (most pixels, then sharpest, then smallest image_id), reject every photo within
    ``max_distance`` of it, and repeat with the best photo left: each rejected photo is a near duplicate *of the
    copy it names*. (Grouping by chains instead would let a rejected photo lie up to (chain length) × threshold
    bits from its kept copy: not a duplicate of it at all.)

    Identical hashes share their neighbours, so the greedy pass runs over distinct hashes (representatives) of
    the rows that have any near duplicate; a 10 M-row call holds a few arrays of n, not n Python objects.

    ``words_owned``: ``hex_hashes`` is an (N, 4) words array the caller hands over and does not read again (say,
    just decoded with ``hash_words`` from a column it then dropped, freeing the 640 MB of text at 10 M rows
    before the search): it is overwritten, as the call's own decoded words are."""
    n = len(image_ids)
    hashes = hash_words(hex_hashes)
    if len(hashes) != n or len(pixels) != n or len(sharpness) != n:
        raise ValueError("image_ids, hashes, pixels and sharpness must have one entry per row")
    kept = np.arange(n, dtype=np.int64)
    if n < 2:
        return DuplicateGroups(kept, np.ones(n, np.int64), np.zeros(n, np.int32))
    # words decoded here, or handed over (``words_owned``), are this call's own: compacted to the representatives
    # and bit-reordered in place (row distances do not change), so no second 320 MB copy at 10 M rows
    rep_of, reps, sub, (pi, pj, _) = _representative_search(hashes, max_distance, method,
                                                            in_place=words_owned or hashes is not hex_hashes)
    del hashes  # ``sub`` holds what is needed from here on
    ri, rj = reps[pi], reps[pj]
    del pi, pj
    has_twin = np.bincount(rep_of, minlength=n) > 1  # per representative row
    linked = np.zeros(n, dtype=bool)
    linked[ri] = linked[rj] = True
    grouped = np.flatnonzero(has_twin[rep_of] | linked[rep_of])
    if len(grouped):
        kept[grouped] = _greedy_keep(grouped, rep_of, ri, rj, pixels, sharpness, image_ids)
    size = np.bincount(kept, minlength=n)[kept].astype(np.int64, copy=False)
    dist = np.zeros(n, dtype=np.int32)  # kept and ungrouped rows: 0 (their own copy)
    out = np.flatnonzero(kept != np.arange(n))
    if len(out):  # a row's hash is its representative's, at that representative's position in ``sub``
        dist[out] = row_distance(sub, np.searchsorted(reps, rep_of[out]), np.searchsorted(reps, rep_of[kept[out]]))
    return DuplicateGroups(kept, size, dist)


def _text(value: object) -> str:
    """An id as text, whether it came from a list, a numpy array or a pyarrow array (a scalar)."""
    return value.as_py() if isinstance(value, pa.Scalar) else str(value)


def _greedy_keep(grouped: np.ndarray, rep_of: np.ndarray, ri: np.ndarray, rj: np.ndarray, pixels: Sequence[int],
                 sharpness: Sequence[float], image_ids: Sequence[str]) -> np.ndarray:
    """The kept row of each row in ``grouped`` (rows with at least one near duplicate), by the greedy rule."""
    n = len(rep_of)
    px = np.asarray(pixels, dtype=np.int64)[grouped]
    sharp = np.nan_to_num(np.asarray(sharpness, dtype=np.float64)[grouped], nan=-1.0)
    ids = np.asarray([_text(image_ids[int(k)]) for k in grouped])
    rows = grouped[np.lexsort((grouped, ids, -sharp, -px))]  # best first
    reps, first = np.unique(rep_of[rows], return_index=True)  # each representative's best member comes first
    by_quality = np.argsort(first, kind="stable")
    reps, best_row = reps[by_quality], rows[first[by_quality]]
    adjacency = coo_matrix((np.ones(2 * len(ri), np.int8), (np.r_[ri, rj], np.r_[rj, ri])), shape=(n, n)).tocsr()
    indptr, neighbours = adjacency.indptr, adjacency.indices
    claimed_by = np.full(n, -1, dtype=np.int64)  # per representative: the kept row it is a near duplicate of
    for rep, best in zip(reps.tolist(), best_row.tolist()):
        if claimed_by[rep] >= 0:
            continue
        claimed_by[rep] = best
        near = neighbours[indptr[rep]:indptr[rep + 1]]
        near = near[claimed_by[near] < 0]
        claimed_by[near] = best
    return claimed_by[rep_of[grouped]]


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
