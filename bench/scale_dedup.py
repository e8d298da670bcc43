"""Scale bench section (issue 13): near-duplicate pair search, multi-index hashing vs brute force.

Synthetic 256-bit pHashes (uniform random bits) with ~1 % planted near duplicates: a copy of another row with
0-24 random bits flipped (the filter's default threshold is 24). Measured, each size in a forked child so each
peak RSS (VmHWM) is its own (the hashes themselves, 32 bytes a row, and making them are part of it):

- at ``--baseline-size`` (default 40k): brute force (``near_pairs(method="brute")``, the pre-issue-13 search)
  and MIH (``near_pairs``, the filter stage's path) in the same process, same hashes: the ratio;
- every size in ``--sizes``: MIH, with every planted pair checked found (recall of the planted pairs) and the
  CPU seconds beside the wall time (the dev machine is shared; CPU time says what the search itself cost);
- at ``--groups-sizes`` (default: the ``--sizes``): the filter stage's whole call, from its Arrow string column of
  hex hashes to kept copies (``hash_words``, then ``group_near_duplicates``: search and greedy ranking), in its own
  child.

Brute force at the large sizes is extrapolated from the baseline size (quadratic). Prints one JSON object per
line on stdout (the ``bench/bench_scale.py`` interface), everything else on stderr.

Usage: python bench/scale_dedup.py [--sizes 1000000,10000000] [--baseline-size 40000] [--groups-sizes SIZES]
       [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_scale import current_rss_mb, in_child, peak_rss_mb, reset_peak  # noqa: E402  (this folder is on sys.path when run as a script)

STAGE = "near-duplicate search"
MAX_DISTANCE = 24


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synthetic_hashes(n: int, seed: int = 0, planted_share: float = 0.01):
    """(hashes, planted i, planted j, planted distance): uniform random rows, then ``planted_share`` of them
    overwritten by a copy of another row with up to ``MAX_DISTANCE`` flipped bits."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 1 << 64, size=(n, 4), dtype=np.uint64)
    k = int(n * planted_share)
    rows = rng.permutation(n)[: 2 * k]
    src, dst = rows[:k], rows[k:]
    flips = rng.integers(0, MAX_DISTANCE + 1, k)
    copy = hashes[src].copy()
    for slot in range(MAX_DISTANCE):  # slot s flips one random bit of the pairs asked for more than s flips
        on = np.flatnonzero(flips > slot)
        bit = rng.integers(0, 256, len(on))
        np.bitwise_xor.at(copy, (on, bit // 64), np.uint64(1) << (bit % 64).astype(np.uint64))
    hashes[dst] = copy
    dist = np.bitwise_count(hashes[src] ^ hashes[dst]).sum(axis=1)  # repeated bits cancel: the true distance
    return hashes, np.minimum(src, dst), np.maximum(src, dst), dist


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _SyntheticIds:
    """Row k's image id (64 hex digits), made when read: stands for the catalog column the filter already holds."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> str:
        return f"{k:064x}"


def measure_groups(size: int) -> list[dict]:
    """The filter stage's grouping on ``size`` rows, as the filter holds and calls it: the hashes as a pyarrow
    ``string`` column (32-bit offsets, what ``pa.array(..., type=pa.string())`` in the filter makes), decoded to
    256-bit words with ``hash_words``, the column dropped, and the words handed over (``words_owned``: compacted and
    bit-reordered in place). The peak counts from before the decode, with the column still held."""
    import numpy as np
    import pyarrow as pa

    from pipeline.filters.dedup import group_near_duplicates, hash_words

    hashes, _, _, _ = synthetic_hashes(size)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    text = np.empty((size, 64), dtype=np.uint8)  # the column's bytes, written in chunks: no 640 MB Python str
    for lo in range(0, size, 1 << 20):
        raw = np.ascontiguousarray(hashes[lo:lo + (1 << 20)].astype(">u8")).view(np.uint8)
        text[lo:lo + len(raw), 0::2], text[lo:lo + len(raw), 1::2] = digits[raw >> 4], digits[raw & 15]
    offsets = pa.py_buffer((np.arange(size + 1, dtype=np.int32) * 64).tobytes())  # 640 M bytes < 2^31 at 10 M
    column = pa.Array.from_buffers(pa.string(), size, [None, offsets, pa.py_buffer(text)])
    del hashes, text, offsets  # the column is the only owner of its buffers, as in the filter
    ids = _SyntheticIds(size)  # the catalog's column in the filter; only grouped rows' ids are ever read
    rng = np.random.default_rng(1)
    pixels, sharp = rng.integers(1, 4, size) * 100_000, rng.random(size)
    held = current_rss_mb()  # the inputs the filter holds anyway: hash column, pixels, sharpness
    reset_peak()  # the peak from here: the call, not making the synthetic inputs
    c0, t0 = _cpu(), time.perf_counter()
    words = hash_words(column)
    del column  # frees the text before the search, as the filter's call does
    g = group_near_duplicates(ids, words, pixels, sharp, MAX_DISTANCE, words_owned=True)
    del words
    seconds, cpu, peak = time.perf_counter() - t0, _cpu() - c0, peak_rss_mb()
    far = int((g.distance > MAX_DISTANCE).sum())
    note = (f"hash_words on a pyarrow string column, the column dropped, then group_near_duplicates(words_owned="
            f"True) (the filter's call): {int(g.rejected.sum()):,} rejected in {len(np.unique(g.kept_index[g.group_size > 1])):,} "
            f"groups, {far} farther than {MAX_DISTANCE} bits from their kept copy; CPU {cpu:.1f} s; peak RSS during "
            f"the decode and the call, of which {held:,.0f} MB held before it (hash column, pixels, "
            f"sharpness, interpreter)")
    return [{"stage": "near-duplicate groups", "size": size, "seconds": round(seconds, 3),
             "peak_rss_mb": round(peak, 1), "measured": True, "note": note, "baseline_seconds": None}]


def measure_search(size: int, baseline: bool) -> list[dict]:
    """Make the hashes, run MIH (and brute force when ``baseline``): the result rows."""
    import numpy as np

    from pipeline.filters.dedup import near_pairs, plan_parts

    hashes, pi, pj, pd = synthetic_hashes(size)
    log(f"{size:,} hashes made; peak RSS so far {peak_rss_mb():.0f} MB")
    out = []
    c0, t0 = _cpu(), time.perf_counter()
    i, j, d = near_pairs(hashes, MAX_DISTANCE)
    seconds, cpu, peak = time.perf_counter() - t0, _cpu() - c0, peak_rss_mb()
    found = set(zip(i.tolist(), j.tolist()))
    want = [(a, b) for a, b, x in zip(pi.tolist(), pj.tolist(), pd.tolist()) if x <= MAX_DISTANCE]
    recall = sum(p in found for p in want)
    plan = plan_parts(size, MAX_DISTANCE)
    shape = "brute force (tiny input)" if plan is None else (
        f"{len(plan)} parts, {sum(len(p.masks) for p in plan)} keys")
    note = (f"MIH ({shape}); {len(i):,} pairs, planted found {recall:,}/{len(want):,}; CPU {cpu:.1f} s")
    row = {"stage": STAGE, "size": size, "seconds": round(seconds, 3), "peak_rss_mb": round(peak, 1),
           "measured": True, "note": note, "baseline_seconds": None, "recall_ok": recall == len(want)}
    if baseline:
        c0, t0 = _cpu(), time.perf_counter()
        bi, bj, bd = near_pairs(hashes, MAX_DISTANCE, method="brute")
        brute = time.perf_counter() - t0
        same = np.array_equal(bi, i) and np.array_equal(bj, j) and np.array_equal(bd, d)
        row["baseline_seconds"] = round(brute, 3)
        row["note"] += (f"; brute force {brute:.1f} s (CPU {_cpu() - c0:.1f} s): {brute / seconds:.0f}x, "
                        f"same pairs: {same}")
        row["brute_same"] = bool(same)
    out.append(row)
    return out


SKEWED_SETS = ("uniform", "shared prefix 64 bits (5 %)", "shared prefix 96 bits (5 %)", "constant bits",
               "one landmark (2 % within 16-40 bits)", "bursts (0.1 % in bursts of 100 within 4 bits)")


def _flip_some(rows, rng, lo: int, hi: int):
    """``rows`` with lo..hi random bits flipped in each (repeats cancel, so at most hi)."""
    import numpy as np

    out = rows.copy()
    k = rng.integers(lo, hi + 1, len(out))
    for slot in range(hi):
        on = np.flatnonzero(k > slot)
        bit = rng.integers(0, 256, len(on))
        np.bitwise_xor.at(out, (on, bit // 64), np.uint64(1) << (bit % 64).astype(np.uint64))
    return out


def skewed_hashes(kind: str, n: int, seed: int = 0):
    """The uniform set with planted pairs (``synthetic_hashes``), skewed as real perceptual hashes are."""
    import numpy as np

    hashes, pi, pj, pdist = synthetic_hashes(n, seed)
    rng = np.random.default_rng(seed + 1)
    rows = rng.permutation(n)
    if kind.startswith("shared prefix"):
        bits = 64 if "64" in kind else 96
        share = rows[: n // 20]
        hashes[share, 0] = hashes[share[0], 0]
        if bits == 96:
            mask = np.uint64((1 << 32) - 1)
            hashes[share, 1] = (hashes[share, 1] & ~mask) | (hashes[share[0], 1] & mask)
    elif kind == "constant bits":
        hashes[:, 0] |= np.uint64(1)  # as the pHash's DC term: always set
        hashes[:, 1] &= ~np.uint64(0xFF)
        hashes[:, 3] |= np.uint64(0xF) << np.uint64(60)
    elif kind.startswith("one landmark"):
        near = rows[: n // 50]
        hashes[near] = _flip_some(np.repeat(hashes[near[0]][None], len(near), axis=0), rng, 16, 40)
    elif kind.startswith("bursts"):
        burst = rows[: n // 1000]
        for b in range(0, len(burst), 100):
            grp = burst[b:b + 100]
            hashes[grp] = _flip_some(np.repeat(hashes[grp[0]][None], len(grp), axis=0), rng, 0, 4)
    # planted pairs the skew overwrote are no longer planted at their distance: keep the untouched ones
    dist = np.bitwise_count(hashes[pi] ^ hashes[pj]).sum(axis=1)
    return hashes, pi, pj, dist


def measure_skew(size: int, kind: str, sample: int = 20_000) -> list[dict]:
    """MIH on one skewed set: time, planted pairs found, and exactness on a random sample of rows (every pair
    among them within the threshold, checked against brute force over the sample)."""
    import numpy as np

    from pipeline.filters.dedup import near_pairs

    hashes, pi, pj, pdist = skewed_hashes(kind, size)
    c0, t0 = _cpu(), time.perf_counter()
    i, j, d = near_pairs(hashes, MAX_DISTANCE)
    seconds, cpu, peak = time.perf_counter() - t0, _cpu() - c0, peak_rss_mb()
    code = i * size + j
    want = pi[pdist <= MAX_DISTANCE] * size + pj[pdist <= MAX_DISTANCE]
    planted = int(np.isin(want, code).sum())
    rows = np.sort(np.random.default_rng(9).choice(size, min(sample, size), replace=False))
    bi, bj, _ = near_pairs(hashes[rows], MAX_DISTANCE, method="brute")
    inside = np.isin(i, rows) & np.isin(j, rows)
    exact = np.array_equal(np.sort(rows[bi] * size + rows[bj]), np.sort(code[inside]))
    note = (f"{kind}: {len(i):,} pairs; planted found {planted:,}/{len(want):,}; a {len(rows):,}-row sample "
            f"against brute force: {'identical' if exact else 'DIFFERENT'}; CPU {cpu:.1f} s")
    return [{"stage": "near-duplicate search, skewed", "size": size, "seconds": round(seconds, 3),
             "cpu_seconds": round(cpu, 2), "peak_rss_mb": round(peak, 1), "measured": True, "note": note,
             "baseline_seconds": None, "recall_ok": planted == len(want) and exact, "set": kind}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--baseline-size", type=int, default=40_000)
    ap.add_argument("--groups-sizes", default=None, help="default: the --sizes")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (< 20 s): smoke test")
    ap.add_argument("--skew-size", type=int, default=1_000_000,
                    help="size of the skewed sets (uniform, shared prefixes, constant bits, a landmark, bursts); "
                         "0: skip them")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    groups = sorted(int(s) for s in (args.groups_sizes or args.sizes).split(",") if s)
    base = args.baseline_size
    if args.quick:
        sizes, base, groups = [20_000, 50_000], 5_000, [20_000]
    rows = in_child(measure_search, base, True)
    b = rows[0]
    per_pair = b["baseline_seconds"] / (base * (base - 1) / 2)
    emit(rows[0])
    for size in sizes:
        emit({"stage": STAGE + " (brute force)", "size": size, "seconds": round(per_pair * size * (size - 1) / 2, 1),
              "peak_rss_mb": None, "measured": False, "baseline_seconds": None,
              "note": f"extrapolated: quadratic from brute force at {base:,} ({b['baseline_seconds']:.1f} s)"})
    for size in sizes:
        for row in in_child(measure_search, size, False):
            emit(row)
    for size in groups:
        for row in in_child(measure_groups, size):
            emit(row)
    skew = 20_000 if args.quick else args.skew_size
    if skew:
        uniform = None
        for kind in SKEWED_SETS:
            for row in in_child(measure_skew, skew, kind):
                uniform = uniform or row["cpu_seconds"]
                row["note"] += f"; {row['cpu_seconds'] / max(uniform, 1e-9):.1f}x the uniform set's CPU time"
                emit(row)


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
