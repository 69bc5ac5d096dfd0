"""The night's repeated-defect and drift signals per product: the ``tables/days`` rows.

A defect that repeats on many parts of a night is scored normal by mutual scoring, because
the night vouches for it; known-good references do not. So the signal is the fraction of the
night's images that the references flag and zero-shot does not (`reference_scoring.night_signals`),
with the night's MuSc+ peaks against the references' own leave-one-out peaks as a drift
measure. `systematic_defect_suspected` fires when at least ``SUSPECT_FRACTION`` of a product's
images, and at least 2, are flagged by the references only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import tables
from .manifests import PoolsRef
from .store import open_pool_store

__all__ = ["SUSPECT_FRACTION", "day_rows", "publish_days", "suspicion_lines"]

# A bad night in the sense of issue 10: "20-60 % of a day's parts"; a fifth is the lower edge.
SUSPECT_FRACTION = 0.2


def day_rows(pools: Sequence[PoolsRef], run_date: str, backbone_key: str, run_id: str) -> list[dict]:
    """One row per product: images, reference set and mode, signals, flag and reason."""
    rows = []
    for ref in pools:
        n_images = sum(len(open_pool_store(Path(p)).attrs["image_ids"]) for p in ref.pool_paths)
        row = {"product": ref.product, "n_images": n_images, "backbone_key": backbone_key, "run_id": run_id}
        attrs = [dict(open_pool_store(Path(p)).attrs) for p in ref.pool_paths]
        if ref.reference_set is None or "reference_only" not in attrs[0]:
            rows.append({**row, "systematic_defect_suspected": False, "reason": "no reference set: not checked"})
            continue
        only = sum(sum(a["reference_only"]) for a in attrs)
        fraction = only / n_images
        drift = max(a["night_plus_median"] for a in attrs) / max(max(a["reference_plus_median"] for a in attrs), 1e-12)
        suspected = only >= 2 and fraction >= SUSPECT_FRACTION
        reason = (
            f"{only} of {n_images} images ({fraction:.0%}) are flagged by the references but not by zero-shot: "
            "a defect repeated across the night"
            if suspected
            else f"{only} of {n_images} images flagged by the references only (threshold {SUSPECT_FRACTION:.0%})"
        )
        rows.append(
            {
                **row,
                "reference_set": ref.reference_set,
                "reference_mode": attrs[0].get("reference_mode"),
                "reference_only_fraction": fraction,
                "night_to_reference_plus": drift,
                "systematic_defect_suspected": suspected,
                "reason": reason,
            }
        )
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
