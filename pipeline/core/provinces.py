"""The one canonical table of Pakistan's seven first-level units, used by every stage.

Ids follow GEOPAK's label ids (``model/province_mapping.json``) so checkpoints and cell tables stay comparable.
The former FATA belongs to Khyber Pakhtunkhwa (merged in 2018); any source that still reports it is mapped there.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Pakistan Standard Time, UTC+5 all year (no DST since 2009): the one definition every stage uses.
PAKISTAN_UTC_OFFSET_HOURS = 5


@dataclass(frozen=True)
class Province:
    id: int
    key: str  # short slug, also the Dagster partition key
    name: str
    iso: str  # ISO 3166-2:PK
    boundary_name: str  # geoBoundaries ADM1 shapeName
    geonames_admin1: tuple[str, ...]  # GeoNames admin-1 codes that belong to this unit
    aliases: tuple[str, ...]
    geopak_images: int  # GEOPAK's per-province image counts (README): the real data's imbalance


PROVINCES: tuple[Province, ...] = (
    Province(0, "sindh", "Sindh", "PK-SD", "Sindh", ("05",), ("sind",), 65221),
    Province(1, "punjab", "Punjab", "PK-PB", "Punjab", ("04",), ("panjab",), 8459),
    Province(
        2,
        "kpk",
        "Khyber Pakhtunkhwa",
        "PK-KP",
        "Khyber Pakhtunkhwa",
        ("03", "01"),  # 01 = Federally Administered Tribal Areas, merged into KP
        ("kp", "nwfp", "north-west frontier province", "fata", "federally administered tribal areas"),
        5344,
    ),
    Province(
        3,
        "ict",
        "Islamabad Capital Territory",
        "PK-IS",
        "Islamabad Capital Territory",
        ("08",),
        ("islamabad", "federal capital territory"),
        4410,
    ),
    Province(4, "gb", "Gilgit-Baltistan", "PK-GB", "Gilgit-Baltistan", ("07",), ("northern areas",), 2379),
    Province(5, "balochistan", "Balochistan", "PK-BA", "Balochistan", ("02",), ("baluchistan",), 3627),
    Province(
        6,
        "ajk",
        "Azad Jammu and Kashmir",
        "PK-JK",
        "Azad Kashmir",
        ("06",),
        ("azad kashmir", "ajk", "azad jammu & kashmir"),
        1075,
    ),
)

PROVINCE_KEYS: tuple[str, ...] = tuple(p.key for p in PROVINCES)
NUM_PROVINCES = len(PROVINCES)
BY_ID = {p.id: p for p in PROVINCES}
BY_KEY = {p.key: p for p in PROVINCES}
BY_ADMIN1 = {code: p for p in PROVINCES for code in p.geonames_admin1}

# Pakistan's bounding box (min_lon, min_lat, max_lon, max_lat), padded slightly beyond geoBoundaries' extent.
PAKISTAN_BBOX = (60.80, 23.60, 77.90, 37.15)


def _norm(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z& -]", "", text.lower().replace("_", " ")).strip()


_BY_NAME: dict[str, Province] = {}
for _p in PROVINCES:
    for _n in (_p.key, _p.name, _p.iso, _p.boundary_name, *_p.aliases):
        _BY_NAME[_norm(_n)] = _p


def lookup(name: str) -> Province:
    """Resolve any spelling a source uses (name, key, ISO code, alias) to the canonical province."""
    p = _BY_NAME.get(_norm(name))
    if p is None:
        raise KeyError(f"unknown province name {name!r}; known: {sorted(_BY_NAME)}")
    return p


# Census population per unit: the documented proxy for where people (and so photos) are, which the sample world's
# province mix follows. Pakistan Bureau of Statistics, 7th Population and Housing Census 2023 (results notified in
# August 2023) for the four provinces and ICT; the 2023 census did not cover Azad Jammu and Kashmir and
# Gilgit-Baltistan, so theirs are the 2017 census counts (the latest official ones).
CENSUS_POPULATION: dict[str, int] = {
    "sindh": 55_696_147, "punjab": 127_688_922, "kpk": 40_856_097, "ict": 2_363_863, "gb": 1_492_924,
    "balochistan": 14_894_402, "ajk": 4_045_366,
}
CENSUS_SOURCE = ("Pakistan Bureau of Statistics, Population and Housing Census 2023 (Punjab, Sindh, Khyber "
                 "Pakhtunkhwa, Balochistan, Islamabad Capital Territory); 2017 census (Azad Jammu and Kashmir, "
                 "Gilgit-Baltistan, not covered in 2023)")


def population_shares() -> dict[str, float]:
    """Each unit's share of Pakistan's census population (``CENSUS_POPULATION``)."""
    total = sum(CENSUS_POPULATION.values())
    return {p.key: CENSUS_POPULATION[p.key] / total for p in PROVINCES}


def imbalance_shares() -> dict[str, float]:
    """Share of images per province in GEOPAK's real data (Sindh ≫ Punjab > KPK > ICT > Balochistan > GB > AJK)."""
    total = sum(p.geopak_images for p in PROVINCES)
    return {p.key: p.geopak_images / total for p in PROVINCES}
