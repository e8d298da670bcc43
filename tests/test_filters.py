"""Unit tests of the filtering stage's domain code (pipeline.filters): decoding, metrics, duplicates, rules, CLIP."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core import reasons
from pipeline.core.store import ImageStore
from pipeline.filters.cache import ImageValueCache
from pipeline.core.decode import load_oriented, to_mode
from pipeline.filters.dedup import group_near_duplicates, hash_matrix, near_pairs
from pipeline.filters.examples import contact_sheet_png
from pipeline.filters.geotag import AccuracyRule, geotag_reasons
from pipeline.filters.indoor import ClipSpec, check_weights
from pipeline.filters.licenses import license_family, license_reasons
from pipeline.filters.metrics import MetricsParams, cached_metrics, measure, measure_many
from pipeline.filters.stage import KEPT, FilterConfig, filter_catalog
from tests.filter_corpus import Case, bad_file_corpus, encode, rotated_exif_pair, scene

REPO = Path(__file__).resolve().parents[1]
LAHORE = (31.5497, 74.3436)


def catalog_of(store: ImageStore, cases: list[Case], **overrides) -> pd.DataFrame:
    """Catalog rows for raw bytes, bypassing the catalog's own checks (the filter must be safe on its own)."""
    rows = []
    for c in cases:
        image_id, rel = store.put(c.data)
        w, h = c.displayed_size or (1, 1)
        rows.append({
            "image_id": image_id, "source": "test", "source_id": c.name, "source_url": None, "path": rel,
            "lat": LAHORE[0], "lon": LAHORE[1], "geo_accuracy": 10.0, "taken_at": pd.Timestamp("2021-03-14", tz="UTC"),
            "owner": "o", "license": "CC-BY-4.0", "title": c.name, "tags": "", "place_id": None,
            "width": w, "height": h, **overrides,
        })
    return pd.DataFrame(rows)


@pytest.fixture()
def offline_clip(tmp_path) -> ClipSpec:
    """The default encoder and tag, with an empty Hugging Face cache: weights are certainly unavailable."""
    empty = tmp_path / "hf-empty"
    empty.mkdir()
    return ClipSpec(cache_dir=str(empty))


def run_stage(tmp_path, catalog, boundaries, clip: ClipSpec, **cfg):
    store = ImageStore(tmp_path)
    config = FilterConfig(clip=clip, workers=1, **cfg)
    return filter_catalog(catalog, store, boundaries, config, tmp_path / "f" / "metrics.parquet",
                          tmp_path / "f" / "indoor.parquet")


# ---------------------------------------------------------------------------------------------- bad-file corpus


def test_bad_file_corpus_gets_expected_reasons(tmp_path, boundaries, offline_clip):
    corpus = bad_file_corpus()
    catalog = catalog_of(ImageStore(tmp_path), corpus)
    res = run_stage(tmp_path, catalog, boundaries, offline_clip)
    got = dict(zip(res.outcomes["source_id"], res.outcomes["outcome"]))
    expected = {c.name: c.expected or KEPT for c in corpus}
    assert got == expected
    # every row is accounted for exactly once, with a detail for every rejection
    assert len(res.kept) + len(res.rejections) == len(corpus)
    assert (res.rejections["stage"] == "filter").all() and res.rejections["detail"].str.len().gt(0).all()
    assert set(res.rejections["reason"]) <= set(reasons.DESCRIPTIONS)
    bomb = res.rejections.set_index("source_id").loc["png_bomb_header", "detail"]
    assert "exceeds limit" in bomb
    assert not res.indoor_evaluated and res.indoor_note.startswith("not evaluated (no pretrained CLIP weights:")


def test_kept_awkward_inputs_are_measured_as_displayed(tmp_path):
    params = MetricsParams()
    for c in bad_file_corpus():
        if c.expected is not None:
            continue
        path = tmp_path / c.name
        path.write_bytes(c.data)
        m = measure(path, "x" * 64, params)
        assert m.get("error") is None, c.name
        assert (m["width"], m["height"]) == c.displayed_size, c.name  # EXIF orientation applied to the size
        assert m["grey_std"] > 10 and m["sharpness"] > 10, c.name  # real content, not a saturated/blank frame
        assert len(m["phash"]) == 64
    corrupt = measure(tmp_path / "corrupt_exif_jpeg", "y" * 64, params)
    assert "Corrupt EXIF" in (corrupt["exif_error"] or "")  # recorded, image kept


def test_modes_become_proper_rgb_and_grey():
    rgb = scene(2, (160, 120))
    cmyk = load_oriented(encode(rgb.convert("CMYK"), quality=95), "RGB", None)
    assert np.abs(np.asarray(cmyk, float) - np.asarray(rgb, float)).mean() < 8  # colours survive, not inverted
    grey = np.asarray(scene(3, (160, 120)).convert("L"), dtype=np.uint16)
    grey16 = load_oriented(encode(Image.fromarray(grey * 257), "PNG"), "L", None)
    assert np.abs(np.asarray(grey16, int) - grey.astype(int)).max() <= 1  # rescaled, not clipped to white
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    assert to_mode(pal, "RGB").getpixel((0, 0)) == (255, 255, 255)  # transparent shown on white
    assert to_mode(Image.new("I", (4, 4), 65535), "L").getpixel((0, 0)) == 255
    assert to_mode(Image.new("F", (4, 4), 0.5), "L").getpixel((0, 0)) == 128


def test_exif_orientation_applied_wherever_pixels_are_read(tmp_path, boundaries, offline_clip):
    upright, rotated, shown = rotated_exif_pair()
    a = np.asarray(load_oriented(upright, "RGB", None), float)
    b = np.asarray(load_oriented(rotated, "RGB", None), float)
    assert a.shape == b.shape == (shown[1], shown[0], 3)
    assert np.abs(a - b).mean() < 4
    # metrics see the same picture: the stored-rotated copy is a near duplicate of the upright one
    catalog = catalog_of(ImageStore(tmp_path), [Case("upright", upright, None, shown),
                                                Case("rotated", rotated, None, shown)])
    res = run_stage(tmp_path, catalog, boundaries, offline_clip)
    assert sorted(res.outcomes["outcome"]) == [KEPT, reasons.NEAR_DUPLICATE]


# ---------------------------------------------------------------------------------------------- near duplicates


def _resized(img: Image.Image, f: float, quality: int) -> bytes:
    small = img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.BILINEAR)
    return encode(small, quality=quality)


def test_resized_and_recompressed_copies_are_grouped_and_different_images_are_not(tmp_path):
    base = scene(100, (320, 240))
    files = {"base": encode(base, quality=95), "r80": _resized(base, 0.8, 70), "r60": _resized(base, 0.6, 60),
             "r90q50": _resized(base, 0.9, 50)}
    files.update({f"other{k}": encode(scene(200 + k, (320, 240)), quality=90) for k in range(12)})
    names = list(files)
    params = MetricsParams()
    rows = [measure(_put(tmp_path, n, d), n, params) for n, d in files.items()]
    g = group_near_duplicates(names, [r["phash"] for r in rows], [r["width"] * r["height"] for r in rows],
                              [r["sharpness"] for r in rows], FilterConfig().phash_max_distance)
    kept_of = {n: names[k] for n, k in zip(names, g.kept_index)}
    assert all(kept_of[n] == "base" for n in ("base", "r80", "r60", "r90q50"))  # largest copy kept
    assert set(np.array(names)[g.rejected]) == {"r80", "r60", "r90q50"}
    assert g.group_size[names.index("base")] == 4
    assert all(kept_of[n] == n and g.group_size[names.index(n)] == 1 for n in names if n.startswith("other"))
    assert g.distance[names.index("r60")] <= FilterConfig().phash_max_distance


def _put(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / f"{name}.jpg"
    p.write_bytes(data)
    return p


def test_a_chain_keeps_what_is_no_duplicate_of_the_kept_copy():
    """A-B-C-D-E, each 20 bits from the next (40 apart two steps away): with A the best, A keeps B out, C is no
    duplicate of A and is kept, and keeps D out; E is kept. Chains no longer make a photo 80 bits away a
    "duplicate"."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 256).astype(bool)
    chain = []
    for k in range(5):
        x = base.copy()
        x[: 20 * k] ^= True
        chain.append(np.packbits(x).tobytes().hex())
    sharp = [9.0, 5.0, 4.0, 3.0, 2.0]
    g = group_near_duplicates(list("abcde"), chain, [100] * 5, sharp, 24)
    assert g.kept_index.tolist() == [0, 0, 2, 2, 4]
    assert g.group_size.tolist() == [2, 2, 2, 2, 1]
    assert g.distance.tolist() == [0, 20, 0, 20, 0]
    assert g.rejected.tolist() == [False, True, False, True, False]


def test_a_chain_through_the_best_copy_is_one_group():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 256).astype(bool)
    b, c = a.copy(), a.copy()
    b[:20] ^= True  # A-B 20 bits apart
    c[:40] ^= True  # B-C 20 bits, A-C 40 bits: one group through B
    far = ~a  # 256 bits from A
    hexes = [np.packbits(x).tobytes().hex() for x in (a, b, c, far)]
    assert near_pairs(hash_matrix(hexes), 24)[2].tolist() == [20, 20]
    g = group_near_duplicates(["a", "b", "c", "d"], hexes, [100, 100, 100, 100], [1.0, 5.0, 2.0, 9.0], 24)
    assert g.kept_index.tolist() == [1, 1, 1, 3]  # B, the sharpest, is within 20 bits of both ends
    assert g.group_size.tolist() == [3, 3, 3, 1]


# ---------------------------------------------------------------------------------------------- catalog-column rules


def test_geotag_reasons(boundaries):
    df = pd.DataFrame({
        "source": ["a", "a", "a", "flickr", "flickr", "a", "a", "flickr"],
        "lat": [0.0, 51.5, 31.63, 31.55, 31.55, 31.55, 31.55, 31.55],
        "lon": [0.0, -0.12, 74.87, 74.34, 74.34, 74.34, 74.34, 74.34],  # null island, London, Amritsar (in bbox)
        "geo_accuracy": [5, 5, 5, 9, 14, 5000, np.nan, np.nan],
    })
    prov = boundaries.locate(df["lat"].to_numpy(), df["lon"].to_numpy())
    code, detail = geotag_reasons(df, prov)
    assert code.tolist() == [reasons.NULL_ISLAND, reasons.OUTSIDE_PAKISTAN, reasons.OUTSIDE_PAKISTAN,
                             reasons.INACCURATE_GEOTAG, "", reasons.INACCURATE_GEOTAG, "", ""]
    assert "outside bbox" in detail[1] and "in no province" in detail[2]
    assert "level 9 < minimum 11" in detail[3] and "5000 m > maximum 1000 m" in detail[5]
    strict = {"*": AccuracyRule(max_metres=3.0)}
    assert geotag_reasons(df, prov, strict)[0][4] == reasons.INACCURATE_GEOTAG  # flickr falls back to '*' rule
    with pytest.raises(ValueError):
        AccuracyRule(min_level=3, max_metres=10)


@pytest.mark.parametrize(
    "value, family",
    [
        ("CC-BY-4.0", "cc"), ("CC BY-NC-SA 2.0", "cc"), ("https://creativecommons.org/licenses/by-sa/4.0/", "cc"),
        ("Attribution-NonCommercial License", "cc"), ("CC0-1.0", "cc0"), ("Public Domain Dedication (CC0)", "cc0"),
        ("https://creativecommons.org/publicdomain/zero/1.0/", "cc0"), ("Public Domain Mark", "public_domain"),
        ("No known copyright restrictions", "no_known_restrictions"),
        ("United States Government Work", "us_government"), ("All Rights Reserved", "all_rights_reserved"),
        ("proprietary", None), ("", None), (None, None),
    ],
)
def test_license_family(value, family):
    assert license_family(value) == family


def test_license_reasons_per_source():
    df = pd.DataFrame({
        "source": ["flickr", "flickr", "flickr", "google", "google", "mine"],
        "license": ["CC BY 2.0", "All Rights Reserved", None, None, "weird", "All Rights Reserved"],
    })
    code, detail = license_reasons(df, license_free_sources=["google"])
    assert code.tolist() == ["", reasons.LICENSE_NOT_ALLOWED, reasons.LICENSE_NOT_ALLOWED, "",
                             reasons.LICENSE_NOT_ALLOWED, reasons.LICENSE_NOT_ALLOWED]
    assert "no licence reported" in detail[2] and "unrecognised" in detail[4]
    own = {"*": ("cc",), "mine": ("all_rights_reserved",)}  # a source whose own photos are allowed
    assert license_reasons(df, own)[0][5] == ""
    with pytest.raises(ValueError):
        license_reasons(df, {"*": ("copyleft",)})


# ---------------------------------------------------------------------------------------------- cache and workers


def test_metrics_cache_reuse_and_key(tmp_path, boundaries, offline_clip):
    items = []
    for k in range(5):
        items.append((f"{k:064x}", str(_put(tmp_path, f"s{k}", encode(scene(300 + k))))))
    cache = tmp_path / "cache.parquet"
    first = cached_metrics(items, MetricsParams(), cache, workers=1)
    assert (first.computed, first.reused) == (5, 0)
    again = cached_metrics(items + [items[0]], MetricsParams(), cache, workers=1)
    assert (again.computed, again.reused) == (0, 5)
    assert again.metrics["image_id"].tolist() == [i for i, _ in items] + [items[0][0]]
    pd.testing.assert_frame_equal(again.metrics.iloc[:5].reset_index(drop=True), first.metrics)
    other = cached_metrics(items[:2], MetricsParams(analysis_size=128), cache, workers=1)
    assert other.computed == 2  # a different analysis size is a different measurement
    assert len(pd.read_parquet(cache)) == 7  # both keys kept
    # the whole stage: a second run decodes nothing
    catalog = catalog_of(ImageStore(tmp_path), [Case(f"c{k}", encode(scene(400 + k)), None, (240, 180))
                                                for k in range(4)])
    assert run_stage(tmp_path, catalog, boundaries, offline_clip).metrics_computed == 4
    rerun = run_stage(tmp_path, catalog, boundaries, offline_clip)
    assert (rerun.metrics_computed, rerun.metrics_reused) == (0, 4)


def test_unreadable_cache_is_rebuilt(tmp_path):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"not parquet")
    cache = ImageValueCache(path, {"image_id": "string", "key": "string", "v": "Float64"})
    assert cache.lookup(["a"], "k")[1] == ["a"]
    cache.add(cache.frame([{"image_id": "a", "key": "k", "v": 1.0}]))
    assert cache.lookup(["a"], "k")[1] == []


def test_two_worker_processes_give_the_same_rows(tmp_path, monkeypatch):
    """This process works from the back and the spawned worker from the front; rows come back in item order
    whoever measured them. Before this process measures anything it waits until the worker has finished the first
    chunk (an event, not a sleep), so both surely take part however slowly the worker starts."""
    import pipeline.filters.metrics as metrics

    items = [(f"{k:064x}", str(_put(tmp_path, f"w{k}", encode(scene(500 + k, (200, 150)))))) for k in range(15)]
    items.append(("f" * 64, str(_put(tmp_path, "broken", b"<html>"))))
    single = measure_many(items, MetricsParams(), workers=1)
    assert single[-1]["error"] == reasons.NOT_AN_IMAGE
    futures: list = []
    real_spawn = metrics.spawn_pool

    def recording_pool(n: int):
        pool = real_spawn(n)
        submit = pool.submit

        def recorded(*args, **kwargs):
            futures.append(submit(*args, **kwargs))
            return futures[-1]

        pool.submit = recorded  # type: ignore[method-assign]
        return pool

    here = []

    def measure_after_the_worker(path, image_id, params):
        here.append(image_id)
        futures[0].result(timeout=300)  # the worker's first chunk is done (a generous bound, not a timing)
        return real_measure(path, image_id, params)

    real_measure = metrics.measure
    monkeypatch.setattr(metrics, "spawn_pool", recording_pool)
    monkeypatch.setattr(metrics, "measure", measure_after_the_worker)  # spawned workers import the real one
    pooled = measure_many(items, MetricsParams(), workers=2, chunk_size=2, min_pool_items=0)
    assert pooled == single
    assert 0 < len(here) < len(items)  # both processes measured some
    assert not set(here) & {image_id for image_id, _ in items[:2]}  # the worker's first chunk was not redone


# ---------------------------------------------------------------------------------------------- indoor (CLIP)


def test_missing_weights_fail_fast_without_importing_open_clip(tmp_path):
    """With nothing cached and HF_HUB_OFFLINE=1 the answer comes without importing open_clip or torch."""
    empty = tmp_path / "empty-hf"
    empty.mkdir()
    code = (
        "import sys, time; t = time.perf_counter();"
        "from pipeline.filters.indoor import ClipSpec, check_weights;"
        f"a = check_weights(ClipSpec(cache_dir={str(empty)!r}, download=True));"
        "print(a.ok, 'open_clip' in sys.modules, 'torch' in sys.modules, round(time.perf_counter() - t, 3));"
        "print(a.why)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={"PATH": "", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    ok, clip_imported, torch_imported, _seconds = out.stdout.split("\n")[0].split()
    assert (ok, clip_imported, torch_imported) == ("False", "False", "False")
    assert "HF_HUB_OFFLINE=1" in out.stdout
    assert not check_weights(ClipSpec(pretrained="")).ok
    assert "not found" in check_weights(ClipSpec(pretrained=str(tmp_path / "nope.bin"))).why
    assert "open_clip_config.json" in check_weights(ClipSpec(model=f"local-dir:{tmp_path}")).why


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_indoor_filter_runs_with_saved_weights(tmp_path, boundaries, caplog):
    """A tiny randomly initialised open_clip model saved by the test: verdicts are meaningless, but loading,
    batching, scoring, caching and the threshold all run for real through the configured-checkpoint path."""
    import open_clip
    import torch

    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(open_clip.CLIP(**TINY_CLIP).state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    (tmp_path / "GeoPakTinyCLIP.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "GeoPakTinyCLIP.json")  # a named model + checkpoint file, as configured

    cases = [Case(f"s{k}", encode(scene(600 + k)), None, (240, 180)) for k in range(5)]
    catalog = catalog_of(ImageStore(tmp_path), cases)
    by_name = ClipSpec(model="GeoPakTinyCLIP", pretrained=str(folder / "open_clip_pytorch_model.bin"))
    assert check_weights(by_name).ok
    everything = run_stage(tmp_path, catalog, boundaries, by_name, indoor_threshold=0.0, clip_batch_size=2)
    assert everything.indoor_evaluated and everything.indoor_note.startswith("evaluated with GeoPakTinyCLIP")
    assert everything.kept.empty and set(everything.rejections["reason"]) == {reasons.INDOOR}
    assert everything.rejections["detail"].str.match(r"p_indoor=0\.\d{3} >= 0\.0").all()

    nothing = run_stage(tmp_path, catalog, boundaries, by_name, indoor_threshold=1.01, clip_batch_size=2)
    assert len(nothing.kept) == 5 and nothing.kept["indoor_score"].between(0, 1).all()
    local_dir = ClipSpec(model=f"local-dir:{folder}", pretrained="")
    via_dir = run_stage(tmp_path, catalog, boundaries, local_dir, indoor_threshold=1.01, clip_batch_size=4)
    np.testing.assert_allclose(via_dir.kept["indoor_score"], nothing.kept["indoor_score"], atol=1e-5)
    cached = pd.read_parquet(tmp_path / "f" / "indoor.parquet")
    assert len(cached) == 10 and cached["key"].nunique() == 2  # scores cached per weights


def test_contact_sheet_shows_placeholders_for_unreadable_files(tmp_path):
    good = _put(tmp_path, "g", encode(scene(1)))
    broken = _put(tmp_path, "b", b"\xff\xd8\xff garbage")
    png = contact_sheet_png({"blurred": [(good, "a:1"), (broken, "a:2")],
                             reasons.DECOMPRESSION_BOMB: [(broken, "a:3")], reasons.MISSING_FILE: [(None, "a:4")]})
    sheet = Image.open(io.BytesIO(png))
    assert sheet.format == "PNG" and sheet.height >= 3 * 96


def test_empty_catalog(tmp_path, boundaries, offline_clip):
    from pipeline.core.schema import CATALOG_SCHEMA, empty_frame

    res = run_stage(tmp_path, empty_frame(CATALOG_SCHEMA), boundaries, offline_clip)
    assert res.kept.empty and res.rejections.empty and res.outcomes.empty


def test_identical_image_id_is_rejected_once_not_kept_twice(tmp_path, boundaries, offline_clip):
    case = Case("a", encode(scene(700)), None, (240, 180))
    catalog = catalog_of(ImageStore(tmp_path), [case, case])
    catalog.loc[1, "source_id"] = "a-again"
    res = run_stage(tmp_path, catalog, boundaries, offline_clip)
    assert res.outcomes["outcome"].tolist() == [KEPT, reasons.DUPLICATE_BYTES]
    assert res.rejections["detail"].iloc[0] == "same image_id as test:a"
    assert res.metrics_computed == 1  # decoded once
