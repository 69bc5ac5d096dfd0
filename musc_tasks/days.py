"""The night's repeated-defect and drift signals per product: the ``tables/days`` rows.

A defect that repeats on many parts of a night is scored normal by mutual scoring, because
the night vouches for it; known-good references do not. The evidence is patch by patch
(`core.reference_only_patches`): a patch the references flag (MuSc+ above the 99th percentile
of the references' own leave-one-out MuSc+) while zero-shot does not (below the 99th percentile
of the references' zero-shot scores tonight). A worn tool, a fixture mark or a dirty lens puts
its defect at one place of the image, so the flag counts, per patch location, the images whose
patch there is flagged, and fires when the most at one location reach ``SUSPECT_FRACTION`` of
the product's images and at least ``MIN_REPEATED_IMAGES``. Scattered flagged patches (the
references missing some normal variation) rarely line up: measured on
`benchmarks/bad_night_signals.py`, ordinary nights reach 2 of 12 images at one location, bad
nights (4 or 5 of 12 repeated) 3 to 5. The rule reads the maps the reference store keeps, so
changing it needs no rescoring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import tables
from .core import exceedance_auc, reference_only_patches
from .manifests import PoolsRef
from .store import open_pool_store

__all__ = [
    "MIN_REPEATED_IMAGES",
    "SUSPECT_FRACTION",
    "PoolEvidence",
    "day_rows",
    "pool_evidence",
    "product_signals",
    "publish_days",
    "suspicion_lines",
]

# A bad night in the sense of issue 10: "20-60 % of a day's parts"; a fifth is the lower edge.
SUSPECT_FRACTION = 0.2
# Two images flagged at one place happen by chance on ordinary nights of 12 (benchmarks/bad_night_signals.py).
MIN_REPEATED_IMAGES = 3


@dataclass(frozen=True)
class PoolEvidence:
    """One pool's repeated-defect evidence."""

    n_images: int
    reference_only_images: int  # images with at least one patch flagged by the references only
    location_counts: np.ndarray  # (L,) int: images flagged by the references only at each patch location
    plus_auc: float  # `exceedance_auc` of the night's MuSc+ patch scores over the references' leave-one-out ones
    grid: tuple[int, int]


def pool_evidence(
    zero_shot: torch.Tensor,
    plus: torch.Tensor,
    reference_zero_shot: torch.Tensor,
    reference_plus: torch.Tensor,
    zero_shot_scale: float,
    plus_scale: float,
    grid: tuple[int, int],
) -> PoolEvidence:
    """The evidence of one pool from its maps.

    Parameters
    ----------
    zero_shot, plus : (N, L) float tensors
        The night's patch scores.
    reference_zero_shot, reference_plus : (M, L) float tensors
        The references' zero-shot scores against the night and their leave-one-out MuSc+.
    zero_shot_scale, plus_scale : float
        The combined rule's scales (`core.reference_scale` of the two reference maps).
    grid : (H, W)
        Patch grid, H * W = L.

    Returns
    -------
    PoolEvidence
    """
    flagged = reference_only_patches(zero_shot, plus, zero_shot_scale, plus_scale)
    return PoolEvidence(
        n_images=int(zero_shot.shape[0]),
        reference_only_images=int(flagged.any(dim=1).sum()),
        location_counts=flagged.sum(dim=0).numpy().astype(np.int64),
        plus_auc=exceedance_auc(plus, reference_plus),
        grid=(int(grid[0]), int(grid[1])),
    )


def product_signals(evidence: Sequence[PoolEvidence]) -> dict:
    """A product's columns of tables/days from its pools' evidence, with the flag and its reason."""
    n_images = sum(e.n_images for e in evidence)
    counts = np.sum([e.location_counts for e in evidence], axis=0)
    location = int(np.argmax(counts))
    repeated = int(counts[location])
    needed = max(MIN_REPEATED_IMAGES, math.ceil(SUSPECT_FRACTION * n_images))
    suspected = repeated >= needed
    (height, width), (row, column) = evidence[0].grid, divmod(location, evidence[0].grid[1])
    if suspected:
        reason = (
            f"{repeated} of {n_images} images ({repeated / n_images:.0%}) have a patch at row {row + 1}/{height}, "
            f"column {column + 1}/{width} that the references flag and zero-shot calls normal: "
            "a defect repeated at one place across the night"
        )
    else:
        reason = (
            f"at most {repeated} of {n_images} images share a patch location that the references flag and "
            f"zero-shot calls normal (alert at {needed}: {SUSPECT_FRACTION:.0%}, at least {MIN_REPEATED_IMAGES})"
        )
    return {
        "reference_only_fraction": sum(e.reference_only_images for e in evidence) / n_images,
        "repeated_defect_images": repeated,
        # the references are the same in every pool, so the pools' U statistics add up
        "night_plus_auc": sum(e.plus_auc * e.n_images for e in evidence) / n_images,
        "systematic_defect_suspected": suspected,
        "reason": reason,
    }


def _stored_evidence(path: Path) -> PoolEvidence:
    group = open_pool_store(path)
    names = ("zero_shot", "plus", "reference_zero_shot", "reference_plus")
    zero_shot, plus, reference_zero_shot, reference_plus = (torch.from_numpy(np.asarray(group[n][:])) for n in names)
    return pool_evidence(
        zero_shot,
        plus,
        reference_zero_shot,
        reference_plus,
        float(group.attrs["zero_shot_scale"]),
        float(group.attrs["plus_scale"]),
        tuple(group.attrs["grid"]),
    )


def day_rows(pools: Sequence[PoolsRef], run_date: str, backbone_key: str, run_id: str) -> list[dict]:
    """One row per product: images, reference set and mode, signals, flag and reason."""
    rows = []
    for ref in pools:
        n_images = sum(len(open_pool_store(Path(p)).attrs["image_ids"]) for p in ref.pool_paths)
        row = {"product": ref.product, "n_images": n_images, "backbone_key": backbone_key, "run_id": run_id}
        if ref.reference_set is None:
            rows.append({**row, "systematic_defect_suspected": False, "reason": "no reference set: not checked"})
            continue
        mode = open_pool_store(Path(ref.pool_paths[0])).attrs.get("reference_mode")
        signals = product_signals([_stored_evidence(Path(p)) for p in ref.pool_paths])
        rows.append({**row, "reference_set": ref.reference_set, "reference_mode": mode, **signals})
    return rows


def publish_days(out_dir: str | Path, run_date: str, backbone_key: str, rows: list[dict]) -> None:
    """Write the night's rows, one partition per (date, product), the backbone key as file stem."""
    for row in rows:
        partition = {"date": run_date, "product": row["product"]}
        content = {k: v for k, v in row.items() if k != "product"}
        table = tables.to_table([content], tables.DAYS_SCHEMA)
        tables.publish_partition(Path(out_dir) / "tables" / "days", partition, backbone_key, table, tables.DAYS_SCHEMA)


def suspicion_lines(rows: list[dict]) -> list[str]:
    """One line per product where a systematic defect is suspected."""
    return [
        f"SYSTEMATIC DEFECT SUSPECTED in {r['product']}: {r['reason']}"
        for r in rows
        if r["systematic_defect_suspected"]
    ]
