"""Small, frozen pointers passed between pipeline tasks: paths, ids and counts, never arrays."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class _Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)


class ImageRecord(_Manifest):
    """One catalogued file, as publishing needs it."""

    image_id: str
    path: str
    relpath: str  # within its product folder
    width: int | None
    height: int | None
    status: str  # "ok" or "failed"
    reason: str | None
    notes: tuple[str, ...]
    duplicate_of: str | None


class ProductRef(_Manifest):
    name: str
    # unique readable contents: (image id, first path in sorted order)
    images: tuple[tuple[str, str], ...]
    n_files: int
    not_scored_reason: str | None = None
    # fixed pools of image ids (evaluation's divide_num split); None: split by pool_size
    pools: tuple[tuple[str, ...], ...] | None = None


class CatalogRef(_Manifest):
    input_dir: str
    run_date: str
    catalog_path: str
    products: tuple[ProductRef, ...]
    empty_products: tuple[str, ...]
    n_files: int
    n_failed: int


class TokenGeometry(_Manifest):
    """How a backbone cuts an image: resolved once per run from the backbone's config."""

    image_size: int  # side S of the squashed image, pixels
    patch_size: int  # side of one patch, pixels
    n_layers: int  # feature layers Y stored per image

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


class TokensRef(_Manifest):
    product: str
    store_path: str
    geometry: TokenGeometry
    image_ids: tuple[str, ...]
    token_rows: tuple[int, ...]
    extracted: int
    reused: int
    # image id -> reason, for files that were readable when catalogued and broke before extraction
    failed: tuple[tuple[str, str], ...] = ()
    pools: tuple[tuple[str, ...], ...] | None = None


class PoolsRef(_Manifest):
    product: str
    tokens: TokensRef
    pool_paths: tuple[str, ...]
    pairs_computed: int
    pairs_reused: int
    # set when pool_paths are reference stores: the set's name@version:content
    reference_set: str | None = None


class ProductScoresRef(_Manifest):
    product: str
    scores_path: str
    pools: PoolsRef


class TopPart(_Manifest):
    """One of a run's most anomalous parts, as the summary lists it."""

    product: str
    path: str
    score: float
    flagged: bool
    margin: float | None  # robust standard deviations above the image threshold (< 0: below)
    heatmap_path: str  # absolute: a path a person can open


class RunSummary(_Manifest):
    run_id: str
    run_date: str
    out_dir: str
    backbone_key: str
    n_images: int
    n_scored: int
    n_flagged: int
    n_failed: int
    seconds: dict[str, float]
    images_extracted: int
    images_token_cached: int
    pairs_computed: int
    pairs_cached: int
    top: tuple[TopPart, ...]  # most anomalous first
    report_path: str | None = None  # OUT/reports/<date>/index.html; None if it could not be built
    alerts: tuple[str, ...] = ()  # one line each, e.g. a suspected systematic defect (tables/days)

    def as_markdown(self) -> str:
        lines = [
            f"# MuSc scores for {self.run_date}",
            "",
            f"- backbone: `{self.backbone_key}`",
            f"- images: {self.n_images} ({self.n_scored} scored, {self.n_flagged} flagged, {self.n_failed} failed)",
            f"- tokens: {self.images_extracted} extracted, {self.images_token_cached} from cache",
            f"- block pairs: {self.pairs_computed} computed, {self.pairs_cached} from cache",
            "- seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()),
            f"- outputs: `{self.out_dir}` (tables/, masks/, heatmaps/, reports/)",
        ]
        if self.report_path:
            lines.append(f"- report: [{self.report_path}]({Path(self.report_path).absolute().as_uri()})")
        if self.alerts:
            lines[1:1] = [f"**{alert}**" for alert in self.alerts] + [""]
        return "\n".join(lines)


def missing_paths(result: object) -> list[str]:
    """The store and file paths a task result names (``*_path``, ``*_paths`` fields) that do not exist.

    A cached result is only as good as the files it points at; the flows recompute a stage
    whose cached manifest names one that is gone.
    """
    if isinstance(result, (tuple, list)):
        return [path for item in result for path in missing_paths(item)]
    if not isinstance(result, _Manifest):
        return []
    missing = []
    for name in type(result).model_fields:
        value = getattr(result, name)
        if name.endswith("_path") and isinstance(value, str):
            missing.extend([value] if not os.path.exists(value) else [])
        elif name.endswith("_paths") and isinstance(value, tuple):
            missing.extend(path for path in value if not os.path.exists(path))
        elif isinstance(value, (tuple, _Manifest)):
            missing.extend(missing_paths(value))
    return missing
