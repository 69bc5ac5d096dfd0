"""Stage 4: masks, heatmaps and the score and region tables of one product."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .imageio import ImageReadError, read_rgb
from .render import heatmap_overlay, mask_pixels, region_rows, write_png
from .rescore import ProductScores, patch_score_rows, score_map

logger = logging.getLogger(__name__)

__all__ = ["ImageRecord", "ProductRows", "output_relpath", "printable", "product_rows"]


@dataclass(frozen=True)
class ImageRecord:
    """One catalogued file, as publishing needs it."""

    image_id: str
    path: str
    relpath: str
    width: int | None
    height: int | None
    status: str  # "ok" or "failed"
    reason: str | None
    notes: tuple[str, ...]
    duplicate_of: str | None


@dataclass(frozen=True)
class ProductRows:
    scores: list[dict]
    regions: list[dict]


def printable(path: str) -> str:
    """A file name as valid UTF-8: undecodable bytes become ``\\xNN`` (tables need UTF-8)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def output_relpath(kind: str, run_date: str, product: str, backbone_key: str, relpath: str, *, keep_suffix: bool) -> str:
    """Where a product image's mask or heatmap goes, relative to OUT; never outside it."""
    source = PurePosixPath(printable(relpath))
    if source.is_absolute() or ".." in source.parts:
        raise ValueError(f"relpath {relpath!r} must stay inside its product folder")
    name = source.name + ".png" if keep_suffix else source.stem + ".png"
    return str(PurePosixPath(kind, run_date, product, backbone_key, *source.parent.parts, name))


def product_rows(
    out_dir: Path,
    run_date: str,
    product: str,
    records: Sequence[ImageRecord],
    scores: ProductScores | None,
    pool_paths: Sequence[Path],
    *,
    backbone_key: str,
    run_id: str,
    not_scored_reason: str | None = None,
) -> ProductRows:
    """Write every scored image's mask and heatmap; return its score and region rows.

    Duplicates (same content) share their original's scores and rank; every path gets its
    own row, mask and heatmap. Files that could not be read get a row with their reason.
    """
    by_id = {s.image_id: s for s in (scores.images if scores else ())}
    ranks = _ranks(scores)
    stems = [PurePosixPath(r.relpath).with_suffix("").as_posix() for r in records]
    clashing = {s for s in stems if stems.count(s) > 1}
    patch_rows = patch_score_rows(pool_paths)
    small = None
    if scores is not None and len(scores.images) < 5:
        small = (
            f"only {len(scores.images)} distinct images in this product: each is compared with its "
            "single most similar other image (MuSc averages the nearest 30 % of 5 or more)"
        )
    score_rows, region_rows_out = [], []
    for record, stem in zip(records, stems):
        row = {
            "image_id": record.image_id,
            "path": printable(record.path),
            "width": record.width,
            "height": record.height,
            "backbone_key": backbone_key,
            "run_id": run_id,
            "note": "; ".join(_notes(record) + ([small] if small and record.status == "ok" else [])) or None,
        }
        scored = by_id.get(record.image_id)
        if record.status != "ok":
            score_rows.append({**row, "status": "failed", "error": record.reason})
            continue
        if scored is None or scores is None:
            score_rows.append({**row, "status": "not_scored", "error": not_scored_reason})
            continue
        keep_suffix = stem in clashing
        mask_rel = output_relpath("masks", run_date, product, backbone_key, record.relpath, keep_suffix=keep_suffix)
        heat_rel = output_relpath("heatmaps", run_date, product, backbone_key, record.relpath, keep_suffix=keep_suffix)
        try:
            image, _ = read_rgb(Path(record.path))
        except ImageReadError as error:
            score_rows.append({**row, "status": "failed", "error": f"unreadable at publish: {error.reason}"})
            continue
        pool_path, pool_row = patch_rows[record.image_id]
        pixel_scores = score_map(pool_path, pool_row, image.height, image.width)
        mask = mask_pixels(pixel_scores, scores.pixel_threshold)
        write_png(_inside(out_dir, mask_rel), mask)
        overlay = heatmap_overlay(np.asarray(image), pixel_scores, vmin=scores.map_min, vmax=scores.map_max)
        write_png(_inside(out_dir, heat_rel), overlay)
        regions = region_rows(mask > 0, pixel_scores)
        for index in range(len(regions["region"])):
            region_rows_out.append(
                {
                    "image_id": record.image_id,
                    "path": printable(record.path),
                    **{name: values[index].item() for name, values in regions.items()},
                    "backbone_key": backbone_key,
                    "run_id": run_id,
                }
            )
        score_rows.append(
            {
                **row,
                "score": scored.score,
                "raw_score": scored.raw_score,
                "rank": ranks[record.image_id],
                "flagged": scored.score > scores.image_threshold,
                "image_threshold": scores.image_threshold,
                "pixel_threshold": scores.pixel_threshold,
                "pool_index": scored.pool_index,
                "pool_images": scored.pool_images,
                "anomalous_fraction": float((mask > 0).mean()),
                "mask_path": mask_rel,
                "heatmap_path": heat_rel,
                "status": "scored",
            }
        )
    return ProductRows(scores=score_rows, regions=region_rows_out)


def _notes(record: ImageRecord) -> list[str]:
    notes = list(record.notes)
    if printable(record.path) != record.path:
        notes.append("file name is not valid UTF-8: undecodable bytes shown as \\xNN")
    if record.duplicate_of:
        notes.append(f"same content as {printable(record.duplicate_of)}: scored once")
    return notes


def _ranks(scores: ProductScores | None) -> dict[str, int]:
    if scores is None:
        return {}
    ordered = sorted(scores.images, key=lambda s: (-s.score, s.image_id))
    return {s.image_id: rank for rank, s in enumerate(ordered, start=1)}


def _inside(out_dir: Path, relpath: str) -> Path:
    target = (out_dir / relpath).resolve()
    if not target.is_relative_to(out_dir.resolve()):
        raise ValueError(f"refusing to write {relpath!r} outside {out_dir}")
    return target
