"""Issue 12, item 12: GLDv2 without the network. A Wikidata outage fails with a short message (how many requests
failed and one host/path, never a full URL with its query string), and a local landmark-coordinates file lets the
source run with no Wikidata request at all."""

from __future__ import annotations

import pandas as pd
import pytest
from tests.crawl_support import fast_http
from geopak_testkit.fake_apis import FakeServer, image_routes
from tests.test_crawl_sources import _crawl, _gldv2_files

from pipeline.sources.gldv2 import Gldv2Config, Gldv2Source
from pipeline.sources.http import CrawlError, HttpStats

DEAD_API = "http://127.0.0.1:9/w/api.php"  # nothing listens on the discard port


def _config(tmp_path, **kw) -> Gldv2Config:
    return Gldv2Config(str(tmp_path / "train.csv"), str(tmp_path / "cats.csv"), str(tmp_path / "attribution.csv"),
                       wikidata_api_url=DEAD_API, wikidata_requests_per_second=1000, batch_size=2, block_mb=0.002,
                       downloads_per_second=0, **kw)


def test_gldv2_wikidata_outage_message_is_short_and_names_no_query(tmp_path, boundaries):
    """Thousands of categories in batches of 50 made a 2.8 KB message of full URLs; say count, host/path, the fix."""
    _gldv2_files(tmp_path, "http://127.0.0.1:9", 20)
    http = fast_http(attempts=3)
    with pytest.raises(CrawlError) as err:
        _crawl(Gldv2Source(_config(tmp_path), http, HttpStats()), "punjab", tmp_path, boundaries, http, HttpStats())
    message = str(err.value)
    assert len(message) < 400, message
    assert "?" not in message and "titles=" not in message and "Category" not in message
    assert "3 failed requests" in message and "127.0.0.1:9/w/api.php" in message
    assert "6 of 6 categories" in message and "GEOPAK_GLDV2_COORDINATES" in message


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_gldv2_runs_offline_from_a_landmark_coordinates_file(tmp_path, boundaries, suffix):
    """Landmark 1 by landmark_id, 2 and 3 by Wikidata id + Commons category (3 is in Sindh), 6 by a Wikidata URI;
    Wikidata is unreachable, so any request would fail the run."""
    with FakeServer() as srv:
        images, _ = _gldv2_files(tmp_path, srv.url, 120)
        image_routes(srv, "/commons/")
        coords = pd.DataFrame({
            "landmark_id": ["1", "", "", "", "bad"],
            "wikidata_id": ["", "Q3", "Q4", "http://www.wikidata.org/entity/Q6", ""],
            "category": ["", "Minar-e-Pakistan", "Category:Mazar-e-Quaid",
                         "http://commons.wikimedia.org/wiki/Category:Lahore_Fort", ""],
            "latitude": [31.5880, 31.5925, 24.8750, 31.5882, None],
            "longitude": [74.3100, 74.3095, 67.0410, 74.3154, None],
        })
        path = tmp_path / f"coords.{suffix}"
        coords.to_csv(path, index=False) if suffix == "csv" else coords.to_parquet(path)
        http, stats = fast_http(attempts=2), HttpStats()
        result = _crawl(Gldv2Source(_config(tmp_path, coordinates_path=str(path)), http, stats), "punjab", tmp_path,
                        boundaries, http, stats)
    assert set(result.manifest["source_id"]) == {i for i, lm in images if lm in (1, 2, 6)}
    m = result.manifest.set_index("place_id")
    assert tuple(m.loc["gldv2:2", ["lat", "lon"]].iloc[0]) == (31.5925, 74.3095)
    assert result.summary["landmarks: located"] == 4 and result.summary["landmarks: in_province"] == 3
    assert result.summary["landmarks: coordinates file rows skipped"] == 1
    assert result.summary["categories resolved via not in the coordinates file"] == 3  # 4, 5 and 1's category


def test_gldv2_coordinates_file_without_the_needed_columns_fails_clearly(tmp_path, boundaries):
    _gldv2_files(tmp_path, "http://127.0.0.1:9", 5)
    (tmp_path / "coords.csv").write_text("name,x,y\nfoo,1,2\n")
    http = fast_http(attempts=2)
    with pytest.raises(CrawlError, match="needs lat, lon and landmark_id or wikidata_id"):
        _crawl(Gldv2Source(_config(tmp_path, coordinates_path=str(tmp_path / "coords.csv")), http, HttpStats()),
               "punjab", tmp_path, boundaries, http, HttpStats())


def test_gldv2_coordinates_file_comes_from_the_environment_at_launch(monkeypatch, tmp_path):
    """GEOPAK_GLDV2_COORDINATES, set after the code location loaded, reaches the source's config at run start."""
    from dagster import build_init_resource_context

    from pipeline.core.paths import DataPaths
    from pipeline.defs.crawl import crawl_resources

    for var in ("GEOPAK_GLDV2_TRAIN_CSV", "GEOPAK_GLDV2_CATEGORIES_CSV", "GEOPAK_GLDV2_COORDINATES"):
        monkeypatch.delenv(var, raising=False)
    resource = crawl_resources()["gldv2"]  # built at load, with nothing set
    monkeypatch.setenv("GEOPAK_GLDV2_TRAIN_CSV", str(tmp_path / "train.csv"))
    monkeypatch.setenv("GEOPAK_GLDV2_CATEGORIES_CSV", str(tmp_path / "cats.csv"))
    monkeypatch.setenv("GEOPAK_GLDV2_COORDINATES", str(tmp_path / "coords.parquet"))
    resource.setup_for_execution(build_init_resource_context())  # what Dagster calls when the run starts
    monkeypatch.delenv("GEOPAK_GLDV2_COORDINATES")  # read at launch: a later change does not matter
    source = resource.source(resource.http_settings(DataPaths.at(tmp_path)), HttpStats())
    assert source.cfg.coordinates_path == str(tmp_path / "coords.parquet")
