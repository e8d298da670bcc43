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

A row whose source reports no licence is rejected unless its source is listed as licence-free (a source whose
terms cover every image it returns); an unrecognised licence string is rejected and quoted in the detail.
"""

from __future__ import annotations

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


def license_reasons(
    catalog: pd.DataFrame,
    allowed: Mapping[str, Collection[str]] | None = None,
    license_free_sources: Collection[str] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """(reason, detail) per row: ``license_not_allowed`` or ''."""
    allowed = dict(DEFAULT_ALLOWED if allowed is None else allowed)
    unknown = {f for fams in allowed.values() for f in fams} - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown licence families {sorted(unknown)}; known: {list(FAMILIES)}")
    free = set(license_free_sources)
    n = len(catalog)
    reason = np.full(n, "", dtype=object)
    detail = np.full(n, "", dtype=object)
    for k, (src, lic) in enumerate(zip(catalog["source"].astype(str), catalog["license"])):
        fam = license_family(lic)
        ok = allowed.get(src, allowed.get(DEFAULT_SOURCE, ()))
        missing = is_missing(lic, blank_text=True)
        if missing:
            if src not in free:
                reason[k], detail[k] = reasons.LICENSE_NOT_ALLOWED, f"{src}: no licence reported"
        elif fam not in ok:
            what = f"family {fam}" if fam else "unrecognised"
            reason[k], detail[k] = reasons.LICENSE_NOT_ALLOWED, f"{src}: {str(lic)[:60]!r} ({what})"
    return reason, detail
