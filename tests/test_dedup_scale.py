"""Near-duplicate search at scale: multi-index hashing must find exactly what brute force finds.

The planted pairs include the worst cases of the pigeonhole bound (every part one bit over its radius except one
part exactly at it), so a wrong radius, a wrong part boundary or a broken covering key loses pairs and fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.filters.dedup import (
    HASH_BITS,
    collapse_identical,
    covering_masks,
    group_near_duplicates,
    make_plan,
    mih_pairs,
    near_pairs,
    plan_parts,
)


def _random_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 1 << 64, size=(n, 4), dtype=np.uint64)


def _flip(h: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """``h`` with the given global bit positions (0 = lowest bit of word 0, as in ``dedup.Part``) flipped."""
    out = h.copy()
    for b in np.asarray(bits, dtype=np.int64).tolist():
        out[b // 64] ^= np.uint64(1) << np.uint64(b % 64)
    return out


def _bound(t: int, max_distance: int) -> list[tuple[int, int, int]]:
    """(start, length, radius) per part from the refined pigeonhole bound, computed here independently of the
    code under test: t near-equal parts; r = t*q + a; parts 0..a within q, the others within q - 1."""
    q, a = divmod(max_distance, t)
    sizes = [HASH_BITS // t + (1 if k < HASH_BITS % t else 0) for k in range(t)]
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    return [(s, ln, q if k <= a else q - 1) for k, (s, ln) in enumerate(zip(starts, sizes))]


def _bit_vectors(masks) -> dict[int, int]:
    """Each local bit's covering vector, read back from the masks: bit b is in the key of the unit vector 2^k
    exactly when its vector has bit k (masks are listed for v = 1, 2, 3, ...)."""
    dim = (len(masks) + 1).bit_length() - 1
    bits = range(max(m.bit_length() for m in masks))
    return {b: sum(1 << k for k in range(dim) if masks[(1 << k) - 1] >> b & 1) for b in bits}


def _blocking_bits(part, masks, count: int) -> list[int]:
    """``count`` bits of ``part`` whose covering vectors are linearly independent (Gaussian elimination over
    GF(2)): with radius + 1 of them no key of the part skips them all, so the part finds nothing by luck."""
    start = part[0]
    basis: list[int] = []  # reduced vectors, each with a distinct leading bit
    chosen: list[int] = []
    for b, v in sorted(_bit_vectors(masks).items()):
        for e in basis:
            v = min(v, v ^ e)
        if v and len(chosen) < count:
            basis.append(v)
            chosen.append(start + b)
    assert len(chosen) == count, "not enough independent bits"
    return chosen


def _boundary_flips(plan, t: int, max_distance: int, distance: int, within: int) -> np.ndarray:
    """The pigeonhole worst case: every part one flip over its radius (flips that block every covering key of
    the part) except part ``within``, which gets its radius exactly; then flips are taken away (from the other
    parts first) until ``distance`` remain. At ``distance == max_distance`` only part ``within`` can find it."""
    parts = _bound(t, max_distance)
    assert [(p.start, p.length, p.radius) for p in plan] == [p for p in parts if p[2] >= 0]
    masks = {p.start: p.masks for p in plan}
    for p in plan:  # the flips really block every key of a part (else the test would silently weaken)
        blocked = sum(1 << (b - p.start) for b in _blocking_bits((p.start, p.length, p.radius), p.masks,
                                                                  p.radius + 1))
        assert all(m & blocked for m in p.masks)
    want = [max(0, r + 1) for _, _, r in parts]
    want[within] = max(0, parts[within][2])
    assert sum(want) == max_distance
    excess = sum(want) - distance
    for k in [k for k in range(t) if k != within] + [within]:
        take = min(excess, want[k])
        want[k] -= take
        excess -= take
    bits = [b for part, w in zip(parts, want) if w for b in _blocking_bits(part, masks[part[0]], w)]
    assert len(bits) == distance
    return np.array(bits, dtype=np.int64)


def _plant(rng, hashes, plan, t, max_distance, per_distance, extra_over=3):
    """Overwrite rows with copies of other rows at every distance 0..max_distance+extra_over: half of them
    worst cases for each part in turn, half uniformly random bits. Returns the planted (i, j, distance), i < j."""
    n = len(hashes)
    rows = rng.permutation(n)
    k = 0
    planted = []
    for dist in range(max_distance + extra_over + 1):
        for rep in range(per_distance):
            src, dst = int(rows[k]), int(rows[k + 1])
            k += 2
            if rep % 2 or dist > max_distance:
                bits = rng.choice(HASH_BITS, dist, replace=False)
            else:
                bits = _boundary_flips(plan, t, max_distance, dist, within=(rep // 2) % len(plan))
            hashes[dst] = _flip(hashes[src], bits)
            planted.append((min(src, dst), max(src, dst), dist))
    return planted


def test_mih_recall_against_brute_force_200k_with_planted_pairs_at_every_distance():
    rng = np.random.default_rng(13)
    n, d = 200_000, 24
    hashes = _random_hashes(rng, n)
    plan = plan_parts(n, d, allow_brute=False)
    assert plan is not None and all(p.length <= 64 for p in plan)
    t = HASH_BITS // min(p.length for p in plan)
    planted = _plant(rng, hashes, plan, t, d, per_distance=40)
    i, j, dist = mih_pairs(hashes, d, plan)
    found = {(a, b): c for a, b, c in zip(i.tolist(), j.tolist(), dist.tolist())}
    within = [(a, b, c) for a, b, c in planted if c <= d]
    missed = [(a, b, c) for a, b, c in within if found.get((a, b)) != c]
    assert not missed, f"MIH missed {len(missed)} of {len(within)} planted pairs, e.g. {missed[:3]}"
    assert not [(a, b) for a, b, c in planted if c > d and (a, b) in found]  # over the threshold: not reported
    # brute force on a subset holding every planted row and random others: MIH restricted to it must match
    planted_rows = np.unique([x for a, b, _ in planted for x in (a, b)])
    others = rng.choice(np.setdiff1d(np.arange(n), planted_rows), 12_000 - len(planted_rows), replace=False)
    subset = np.sort(np.concatenate([planted_rows, others]))
    bi, bj, bd = near_pairs(hashes[subset], d, method="brute")
    brute = set(zip(subset[bi].tolist(), subset[bj].tolist(), bd.tolist()))
    inside = np.zeros(n, bool)
    inside[subset] = True
    mih_in_subset = {(a, b, c) for (a, b), c in found.items() if inside[a] and inside[b]}
    assert brute == mih_in_subset
    assert len(brute) >= len(within)
    # the automatic path (identical hashes collapsed, plan chosen) gives the same pairs
    auto = near_pairs(hashes, d)
    assert np.array_equal(auto[0], i) and np.array_equal(auto[1], j) and np.array_equal(auto[2], dist)


@pytest.mark.parametrize("max_distance", range(13))
def test_small_sets_every_plan_matches_brute_force(max_distance):
    """Clusters of near copies (so pairs exist at every distance) and one giant bucket of identical hashes."""
    rng = np.random.default_rng(100 + max_distance)
    for trial in range(3):
        centres = _random_hashes(rng, 6)
        rows = [centres[rng.integers(6)] for _ in range(30)]  # identical copies: a giant bucket for 30 rows
        for _ in range(250):
            c = centres[rng.integers(6)]
            rows.append(_flip(c, rng.choice(HASH_BITS, rng.integers(0, max_distance + 4), replace=False)))
        rows.extend(_random_hashes(rng, 40))
        hashes = np.array(rows)[rng.permutation(len(rows))]
        expected = near_pairs(hashes, max_distance, method="brute")
        assert len(expected[0]) > 0
        for t in sorted({4, 5, max(4, max_distance + 1), max(4, max_distance // 2)}):
            plan = make_plan(t, max_distance)
            got = mih_pairs(hashes, max_distance, plan)
            for a, b in zip(got, expected):
                assert np.array_equal(a, b), f"t={t}, d={max_distance}, trial {trial}"
        auto = near_pairs(hashes, max_distance, method="mih")
        for a, b in zip(auto, expected):
            assert np.array_equal(a, b)


def test_covering_keys_miss_every_small_set_of_bits():
    """Pagh's property, checked exhaustively on a short part: any <= radius bits avoid some mask entirely."""
    from itertools import combinations

    for length, radius in ((12, 2), (12, 3), (9, 4)):  # more bits than vectors, and fewer
        masks = covering_masks(length, radius)
        assert len(masks) == 2 ** (radius + 1) - 1
        assert all(0 < m < 1 << length for m in masks)
        for r in range(radius + 1):
            for bits in combinations(range(length), r):
                flipped = sum(1 << b for b in bits)
                assert any(m & flipped == 0 for m in masks), (length, radius, bits)


def test_giant_bucket_of_identical_hashes_stays_compact_and_exact():
    rng = np.random.default_rng(5)
    blank = _random_hashes(rng, 1)[0]
    hashes = np.vstack([np.repeat(blank[None], 60_000, axis=0), _random_hashes(rng, 40_000)])
    hashes[60_000:60_005] = [_flip(blank, rng.choice(HASH_BITS, k, replace=False)) for k in (1, 5, 12, 24, 25)]
    hashes = hashes[rng.permutation(len(hashes))]
    rep_of, reps = collapse_identical(hashes)
    assert len(reps) == 40_001 and np.all(hashes[rep_of] == hashes)
    ids = [f"{k:064x}" for k in range(len(hashes))]
    hexes = [np.asarray(h, ">u8").tobytes().hex() for h in hashes]
    g = group_near_duplicates(ids, hexes, np.ones(len(ids), int), np.zeros(len(ids)), 24)
    blank_rows = np.flatnonzero(np.all(hashes == blank, axis=1))
    group = g.group_size[blank_rows[0]]
    assert group == 60_000 + 4  # the blanks, and the copies 1, 5, 12 and 24 bits away; not the one at 25
    assert int(g.kept_index[blank_rows[0]]) == int(blank_rows[0])  # all tie: the smallest image_id wins
    assert g.rejected.sum() == group - 1
    # near_pairs on a smaller blank bucket: every identical pair is listed, at distance 0
    small = np.vstack([np.repeat(blank[None], 300, axis=0), hashes[:2000]])
    expected = near_pairs(small, 24, method="brute")
    got = near_pairs(small, 24)
    for a, b in zip(got, expected):
        assert np.array_equal(a, b)


def _reference_groups(ids, hashes, pixels, sharp, max_distance):
    """The rule stated plainly (quadratic, Python): keep the best photo left (most pixels, sharpest, smallest id),
    reject every undecided photo within the threshold of it, repeat."""
    n = len(ids)

    def dist(a, b):
        return sum(int(x ^ y).bit_count() for x, y in zip(hashes[a], hashes[b]))

    kept_of = [None] * n
    for k in sorted(range(n), key=lambda k: (-pixels[k], -(sharp[k] if sharp[k] == sharp[k] else -1.0), ids[k], k)):
        if kept_of[k] is None:
            kept_of[k] = k
            for m in range(n):
                if kept_of[m] is None and dist(k, m) <= max_distance:
                    kept_of[m] = k
    return kept_of, [kept_of.count(kept_of[k]) for k in range(n)]


def test_groups_match_the_plain_rule_on_clustered_hashes():
    rng = np.random.default_rng(7)
    centres = _random_hashes(rng, 8)
    hashes = np.array([_flip(centres[rng.integers(8)], rng.choice(HASH_BITS, rng.integers(0, 30), replace=False))
                       for _ in range(160)])
    ids = [f"{rng.integers(1 << 62):064x}" for _ in range(len(hashes))]
    pixels = rng.choice([100, 200, 300], len(hashes))
    sharp = rng.choice([1.0, 2.0, np.nan], len(hashes))
    hexes = [np.asarray(h, ">u8").tobytes().hex() for h in hashes]
    kept, size = _reference_groups(ids, hashes, pixels, sharp, 24)
    for method in ("mih", "brute", "auto"):
        g = group_near_duplicates(ids, hexes, pixels, sharp, 24, method=method)
        assert g.kept_index.tolist() == kept and g.group_size.tolist() == size, method
        assert np.all(g.distance <= 24), "every rejected photo lies within the threshold of its kept copy"
        assert g.distance.tolist() == [sum(int(x ^ y).bit_count() for x, y in zip(hashes[k], hashes[kept[k]]))
                                       for k in range(len(hashes))]


def test_bad_hashes_and_arguments_are_refused():
    from pipeline.filters.dedup import hash_matrix

    with pytest.raises(ValueError, match="256 bits"):
        hash_matrix(["ab" * 16])
    with pytest.raises(ValueError):
        hash_matrix(["zz" * 32])
    with pytest.raises(ValueError, match="256 bits"):
        hash_matrix(["  " + "ab" * 31])  # 64 characters, but fromhex skips the spaces: 31 bytes
    with pytest.raises(ValueError, match="method"):
        near_pairs(np.zeros((3, 4), np.uint64), 2, method="faiss")
    with pytest.raises(ValueError, match=">= 0"):
        near_pairs(np.zeros((3, 4), np.uint64), -1)


def test_part_values_are_the_parts_bits():
    """Parts that straddle two words are cut right (checked against a bit-by-bit reading)."""
    from pipeline.filters.dedup import part_values

    rng = np.random.default_rng(3)
    hashes = _random_hashes(rng, 50)
    bits = (hashes[:, :, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)  # bit g = word g//64, bit g%64
    bits = bits.reshape(len(hashes), HASH_BITS)
    for t in range(4, 26):
        for start, length, _ in _bound(t, 24):
            expected = (bits[:, start:start + length] << np.arange(length, dtype=np.uint64)).sum(axis=1)
            assert np.array_equal(part_values(hashes, start, length), expected.astype(np.uint64)), (t, start)


def test_hash_words_from_arrow_match_the_hex_reader_without_python_strings():
    """The filter's Parquet column (a pyarrow string array, sliced and chunked) decodes to the same words as the
    hex reader, and the grouping fed words gives the same groups as fed hex strings."""
    import pyarrow as pa

    from pipeline.filters.dedup import hash_matrix, hash_words

    rng = np.random.default_rng(11)
    centres = _random_hashes(rng, 5)
    hashes = np.array([_flip(centres[rng.integers(5)], rng.choice(HASH_BITS, rng.integers(0, 30), replace=False))
                       for _ in range(300)])
    hexes = [np.asarray(h, ">u8").tobytes().hex() for h in hashes]
    column = pa.chunked_array([pa.array(hexes[:120]), pa.array([h.upper() for h in hexes[120:]])])
    assert np.array_equal(hash_words(column), hash_matrix(hexes))
    assert np.array_equal(hash_words(pa.array(hexes).slice(7, 50)), hashes[7:57])
    ids = [f"{k:064x}" for k in range(len(hexes))]
    pixels, sharp = rng.choice([100, 200], len(hexes)), rng.random(len(hexes))
    a = group_near_duplicates(ids, hexes, pixels, sharp, 24)
    b = group_near_duplicates(pa.array(ids), hash_words(column), pixels, sharp, 24)
    assert np.array_equal(a.kept_index, b.kept_index) and np.array_equal(a.group_size, b.group_size)
    for bad, message in ((pa.array(["ab" * 31]), "64 hex"), (pa.array(["zz" * 32]), "hexadecimal"),
                         (pa.array([None], pa.string()), "missing"), (pa.array([1]), "strings")):
        with pytest.raises(ValueError, match=message):
            hash_words(bad)


def test_words_handed_over_give_the_same_groups_and_a_caller_array_is_left_alone():
    """``words_owned`` lets the call compact (identical hashes here) and bit-reorder the caller's words in place:
    the groups and distances are those of the hex input; without it the caller's array is unchanged. 32- and
    64-bit offset string columns decode alike (no cast copy of the text)."""
    import pyarrow as pa

    from pipeline.filters.dedup import hash_words

    rng = np.random.default_rng(12)
    centres = _random_hashes(rng, 6)
    hashes = np.array([_flip(centres[rng.integers(6)], rng.choice(HASH_BITS, rng.integers(0, 4) * 9, replace=False))
                       for _ in range(400)])  # 0 flips: many identical rows, so the words get compacted
    hexes = [np.asarray(h, ">u8").tobytes().hex() for h in hashes]
    assert np.array_equal(hash_words(pa.array(hexes, pa.large_string())), hash_words(pa.array(hexes, pa.string())))
    ids = [f"{k:064x}" for k in range(len(hexes))]
    pixels, sharp = rng.choice([100, 200], len(hexes)), rng.random(len(hexes))
    want = group_near_duplicates(ids, hexes, pixels, sharp, 24)
    assert want.rejected.sum() > 50 and (want.distance > 0).any()
    words = hash_words(pa.array(hexes))
    kept_words = words.copy()
    lent = group_near_duplicates(ids, words, pixels, sharp, 24)
    assert np.array_equal(words, kept_words)  # not handed over: untouched
    owned = group_near_duplicates(ids, words, pixels, sharp, 24, words_owned=True)
    assert not np.array_equal(words, kept_words)  # handed over: overwritten in place, not copied
    for got in (lent, owned):
        for field in ("kept_index", "group_size", "distance"):
            assert np.array_equal(getattr(got, field), getattr(want, field)), field


def _skewed_sets(n: int, rng) -> dict[str, np.ndarray]:
    """Hash sets whose bits are not independent and uniform, as real pHashes are not."""
    base = _random_hashes(rng, n)
    sets = {}
    prefix = base.copy()
    rows = rng.permutation(n)[: n // 20]
    prefix[rows, 0] = prefix[rows[0], 0]  # 5 % share their first 64 bits
    prefix[rows[: n // 100], 1] = prefix[rows[0], 1]  # 1 % their first 128
    sets["shared prefixes"] = prefix
    constant = base.copy()
    constant[:, 0] |= np.uint64(0xFFFF)  # 16 bits always set, 8 never
    constant[:, 2] &= ~np.uint64(0xFF << 8)
    sets["constant bits"] = constant
    landmark = base.copy()
    centre = landmark[0].copy()
    for r in rng.permutation(n)[: n // 20]:  # 5 % within 8-30 bits of one landmark's look
        landmark[r] = _flip(centre, rng.choice(HASH_BITS, rng.integers(8, 31), replace=False))
    sets["one landmark"] = landmark
    return sets


@pytest.mark.parametrize("heavy_bucket", [4, 256])
def test_mih_is_exact_on_skewed_hashes(heavy_bucket):
    """Bits dealt by balance and overfull buckets compared by brute force: still every pair within the
    threshold, no other (against brute force), with the heavy-row path forced on (bucket limit 4) and as shipped."""
    rng = np.random.default_rng(3)
    for name, hashes in _skewed_sets(6000, rng).items():
        expected = near_pairs(hashes, 24, method="brute")
        got = mih_pairs(hashes, 24, plan_parts(len(hashes), 24, allow_brute=False), heavy_bucket=heavy_bucket)
        for a, b in zip(got, expected):
            assert np.array_equal(a, b), name


def test_bit_dealing_spreads_shared_and_constant_bits_over_the_parts():
    from pipeline.filters.dedup import bit_balance, dealt_bit_order, permute_bits, row_distance

    rng = np.random.default_rng(4)
    hashes = _random_hashes(rng, 4000)
    hashes[:, 0] = np.uint64(0x0123456789ABCDEF)  # word 0 constant: 64 uninformative bits
    order = dealt_bit_order(bit_balance(hashes), 6)
    assert sorted(order.tolist()) == list(range(256))
    parts = [order[s:s + n] for s, n in ((p.start, p.length) for p in make_plan(6, 24))]
    constant_per_part = [int((part < 64).sum()) for part in parts]
    assert sum(constant_per_part) == 64 and max(constant_per_part) - min(constant_per_part) <= 1
    moved = permute_bits(hashes, order)
    i, j = np.arange(0, 4000, 2), np.arange(1, 4000, 2)
    assert np.array_equal(row_distance(moved, i, j), row_distance(hashes, i, j))  # distances unchanged
