"""Where everything lives: the input folder of a day and every store under OUT.

OUT/cache/catalogs/<date>/<key>.json           the day's catalog (one record per file)
OUT/cache/tokens/<backbone_key>/<product>.zarr  token store, shared by every day
OUT/cache/pools/<backbone_key>/<product>/<pool_key>.zarr, scores-<key>.json
OUT/cache/references/<backbone_key>/<product>/<name>.json  known-good reference sets
OUT/maps/<date>/<product>/<backbone_key>.zarr   raw patch-grid anomaly maps of a day
OUT/tables/, OUT/masks/, OUT/heatmaps/, OUT/crops/  the published results
OUT/reports/index.html, OUT/reports/<date>/     the morning reports
OUT/evaluation/                                 `musc evaluate`'s own tree, laid out like OUT
"""

from __future__ import annotations

from pathlib import Path

from .identity import path_segment

__all__ = [
    "catalog_path",
    "day_input",
    "evaluation_dir",
    "maps_store_path",
    "pool_stores_dir",
    "reference_set_path",
    "reference_sets_dir",
    "reports_dir",
    "token_store_path",
    "token_stores_dir",
]


def day_input(pattern: str, day: str) -> str:
    """The input folder of ``day`` (YYYY-MM-DD): ``pattern`` with ``{date}`` filled in."""
    return pattern.replace("{date}", day)


def _cache_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "cache"


def catalog_path(out_dir: str | Path, run_date: str, key: str) -> Path:
    """The catalog records of one day, named by their content key."""
    return _cache_dir(out_dir) / "catalogs" / run_date / f"{key}.json"


def token_stores_dir(out_dir: str | Path, backbone_key: str) -> Path:
    """The token stores of one backbone, one per product."""
    return _cache_dir(out_dir) / "tokens" / backbone_key


def token_store_path(out_dir: str | Path, backbone_key: str, product: str) -> Path:
    """The token store of one product and backbone, shared by every day."""
    return token_stores_dir(out_dir, backbone_key) / f"{path_segment(product)}.zarr"


def pool_stores_dir(out_dir: str | Path, backbone_key: str, product: str | None = None) -> Path:
    """The pool stores of a backbone, or of one of its products."""
    root = _cache_dir(out_dir) / "pools" / backbone_key
    return root if product is None else root / path_segment(product)


def reference_sets_dir(out_dir: str | Path) -> Path:
    """Every known-good reference set, by backbone and product."""
    return _cache_dir(out_dir) / "references"


def reference_set_path(out_dir: str | Path, backbone_key: str, product: str, name: str) -> Path:
    """The current version of one reference set (its tokens are in the product's token store)."""
    return reference_sets_dir(out_dir) / backbone_key / path_segment(product) / f"{path_segment(name)}.json"


def maps_store_path(out_dir: str | Path, run_date: str, product: str, backbone_key: str) -> Path:
    """The raw anomaly maps of one day, product and backbone (written by publish)."""
    return Path(out_dir) / "maps" / run_date / path_segment(product) / f"{backbone_key}.zarr"


def reports_dir(out_dir: str | Path) -> Path:
    """The morning reports: the index of nights and one folder per night."""
    return Path(out_dir) / "reports"


def evaluation_dir(out_dir: str | Path) -> Path:
    """Where evaluations write everything (tables, masks, caches), apart from the production nights.

    Laid out like OUT itself, so the nights' tables, reports and day signals never see a
    benchmark's images, and ``--out OUT/evaluation`` works with every command that reads OUT.
    """
    return Path(out_dir) / "evaluation"
