"""Licence allowlist per source, on the catalog's ``license`` column.

Sources spell licences differently (SPDX ids like ``CC-BY-4.0``, Creative Commons URLs, Flickr's names such as
"Attribution-ShareAlike License" or "No known copyright restrictions"), so each value is first mapped to a
family, and the allowlist names families:

    cc                      any Creative Commons licence (BY, BY-SA, BY-NC, BY-ND, ... any version)
    cc0                     CC0 public-domain dedication
    public_domain           Public Domain Mark / "public domain"
    no_known_restrictions   Flickr Commons' "No known copyright restrictions"
    us_government           "United States Government Work"
    all_rights_reserved     explicitly all rights reserved (never in the default allowlist)

An allowlist entry is a family, or narrower: a licence name as a source spells it ("CC BY 4.0", "Public Domain
Mark", "No known copyright restrictions"), or a name pattern ("CC BY*", also written "all CC BY": every CC BY
variant and version, NC and ND included; "CC BY-SA*"). Names compare case-, space- and hyphen-blind, so "CC BY-SA*"
also takes the SPDX spelling "CC-BY-SA-4.0". Flickr's crawler resolves the same entries against the licence table
the service lists (``pipeline.sources.flickr``), so one spelling works at the crawl and at this filter.

A row whose source reports no licence is rejected unless its source is listed as licence-free (a source whose
terms cover every image it returns); an unrecognised licence string is rejected and quoted in the detail.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Mapping

import numpy as np
import pandas as pd

from pipeline.core import reasons
from pipeline.core.values import is_missing

DEFAULT_SOURCE = "*"
FAMILIES = ("cc", "cc0", "public_domain", "no_known_restrictions", "us_government", "all_rights_reserved")
DEFAULT_ALLOWED: dict[str, tuple[str, ...]] = {
    DEFAULT_SOURCE: ("cc", "cc0", "public_domain", "no_known_restrictions", "us_government"),
}

# (family, pattern) in priority order: the CC0 / public-domain forms before the generic Creative Commons ones.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (family, re.compile(p))
    for family, p in (
        ("cc0", r"\bcc0\b|cc[- ]?zero|publicdomain/zero|public domain dedication"),
        ("public_domain", r"public[- ]?domain|publicdomain/mark|\bpdm\b"),
        ("no_known_restrictions", r"no known copyright restrictions|flickr\.com/commons/usage"),
        ("us_government", r"(united states|u\.?s\.?) government work|usa\.gov/(government-works|copyright)"),
        ("all_rights_reserved", r"all rights reserved|^arr$|^\u00a9|^copyright\b"),
        ("cc", r"^cc[- ]?by|creativecommons\.org/licenses/|creative commons|^attribution\b"),
    )
)


def license_family(value: str | None) -> str | None:
    """The family of a licence string, or None when it is missing or not recognised."""
    if is_missing(value):
        return None
    text = " ".join(str(value).strip().lower().split())
    if not text:
        return None
    for family, pattern in _PATTERNS:
        if pattern.search(text):
            return family
    return None


# deeds of the families that have one fixed URL (Flickr's licence list uses the same ones)
_FAMILY_URLS = {
    "cc0": "https://creativecommons.org/publicdomain/zero/1.0/",
    "no_known_restrictions": "https://www.flickr.com/commons/usage/",
    "us_government": "https://www.usa.gov/government-copyright",
}
_PUBLIC_DOMAIN_MARK = "https://creativecommons.org/publicdomain/mark/1.0/"
_CC_NAME = re.compile(r"\b(by(?: (?:nc|sa|nd))*)\b.*?\b(\d\.\d)\b")


def license_url(value: str | None) -> str | None:
    """The licence deed's URL for a licence as a source spells it ("CC BY-SA 4.0", "CC-BY-4.0", "CC0-1.0", a URL,
    Flickr's names), so an export can link every image's licence; None when the name does not say which deed
    (a CC name without a version, an unknown string, all rights reserved)."""
    if is_missing(value, blank_text=True):
        return None
    text = str(value).strip()
    if re.match(r"https?://", text, re.IGNORECASE):
        return text
    family = license_family(text)
    if family in _FAMILY_URLS:
        return _FAMILY_URLS[family]
    plain = _plain(text)
    if family == "public_domain":
        return _PUBLIC_DOMAIN_MARK if ("mark" in plain or "pdm" in plain.split()) else None
    m = _CC_NAME.search(plain) if family == "cc" else None
    return f"https://creativecommons.org/licenses/{m.group(1).replace(' ', '-')}/{m.group(2)}/" if m else None


def _plain(text: str) -> str:
    """Case-, space- and hyphen-blind form of a licence name ("CC-BY-SA-4.0" and "CC BY-SA 4.0" are equal)."""
    return " ".join(re.sub(r"[-_]", " ", str(text).lower()).split())


def _selector(selector: str) -> tuple[str | None, str]:
    """(family, name pattern) of an allowlist entry: a family's key, or the plain name or ``fnmatch`` pattern
    ("all CC BY" is "cc by*")."""
    key = _plain(selector)
    if key.replace(" ", "_") in FAMILIES:
        return key.replace(" ", "_"), key
    return None, key[4:] + "*" if key.startswith("all ") else key


def check_selector(selector: str) -> str:
    """``selector`` when it can select something: a family, a name pattern, or a name a family recognises.

    A typo such as "copyleft" is refused here (before any row is judged), not silently matched against nothing.
    """
    family, pattern = _selector(selector)
    if family or "*" in pattern or license_family(selector):
        return selector
    raise ValueError(f"unknown licence family or name {selector!r}; families: {list(FAMILIES)}, or a licence "
                     f'name ("CC BY 4.0"), or a pattern ("CC BY*", "all CC BY")')


def license_selected(selector: str, value: str | None) -> bool:
    """Whether the allowlist entry ``selector`` (family, licence name or pattern) takes the licence ``value``."""
    if is_missing(value):
        return False
    family, pattern = _selector(selector)
    if family:
        return license_family(value) == family
    name = _plain(str(value))
    return fnmatch.fnmatchcase(name, pattern) if "*" in pattern else name == pattern


def license_reasons(
    catalog: pd.DataFrame,
    allowed: Mapping[str, Collection[str]] | None = None,
    license_free_sources: Collection[str] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """(reason, detail) per row: ``license_not_allowed`` or ''."""
    allowed = dict(DEFAULT_ALLOWED if allowed is None else allowed)
    for entries in allowed.values():
        for entry in entries:
            check_selector(entry)
    free = set(license_free_sources)
    n = len(catalog)
    reason = np.full(n, "", dtype=object)
    detail = np.full(n, "", dtype=object)
    verdicts: dict[tuple[str, object], tuple[str, str]] = {}  # a catalog repeats a handful of licences per source
    for k, (src, lic) in enumerate(zip(catalog["source"].astype(str), catalog["license"])):
        key = (src, None if is_missing(lic, blank_text=True) else str(lic))
        if key not in verdicts:
            verdicts[key] = _verdict(src, key[1], allowed.get(src, allowed.get(DEFAULT_SOURCE, ())), free)
        reason[k], detail[k] = verdicts[key]
    return reason, detail


def _verdict(src: str, lic: str | None, entries: Collection[str], free: Collection[str]) -> tuple[str, str]:
    """(reason, detail) for one source's licence string (None: none reported)."""
    if lic is None:
        return ("", "") if src in free else (reasons.LICENSE_NOT_ALLOWED, f"{src}: no licence reported")
    if any(license_selected(entry, lic) for entry in entries):
        return "", ""
    fam = license_family(lic)
    what = f"family {fam}" if fam else "unrecognised"
    return reasons.LICENSE_NOT_ALLOWED, f"{src}: {lic[:60]!r} ({what})"
