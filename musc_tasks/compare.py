"""Compare two backbones' scores of the same day: rank agreement and changed flags."""

from __future__ import annotations

import pandas as pd

from .config import PRESETS

__all__ = ["resolve_backbone_key", "compare_backbones"]


def resolve_backbone_key(name: str, available: list[str]) -> str:
    """A backbone key from an exact key, a preset name, or a unique part of a key."""
    if name in available:
        return name
    if name in PRESETS and PRESETS[name].key in available:
        return PRESETS[name].key
    matches = [key for key in available if name in key]
    if len(matches) == 1:
        return matches[0]
    choices = ", ".join(sorted(available)) or "none"
    raise ValueError(f"backbone {name!r} matches {len(matches)} of the scored backbones; use one of: {choices}")


def compare_backbones(scores: pd.DataFrame, key_a: str, key_b: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-product Spearman rank correlation and the images whose flag changed.

    Parameters
    ----------
    scores : DataFrame
        Score-table rows of one day (columns product, image_id, path, backbone_key, score,
        flagged, status). Images are matched by content (``image_id``, the sha256 of the
        file), so a file renamed or moved between the two runs still pairs up; files with the
        same content count once, under their first path.

    Returns
    -------
    summary : DataFrame
        product, images (scored by both), spearman, flagged_a, flagged_b, changed.
    changed : DataFrame
        product, path, score_a, score_b, flagged_a, flagged_b for every flag that differs.
    """
    scored = scores[scores["status"] == "scored"]
    columns = ["product", "image_id", "path", "score", "flagged"]

    def side(key: str) -> pd.DataFrame:
        rows = scored[scored["backbone_key"] == key][columns].sort_values(["product", "path"])
        return rows.drop_duplicates(["product", "image_id"])

    both = side(key_a).merge(side(key_b).drop(columns="path"), on=["product", "image_id"], suffixes=("_a", "_b"))
    rows = []
    for product, group in both.groupby("product", sort=True):
        # Spearman = Pearson of the ranks; ties share their average rank
        spearman = group["score_a"].rank().corr(group["score_b"].rank()) if len(group) > 1 else float("nan")
        rows.append(
            {
                "product": product,
                "images": len(group),
                "spearman": spearman,
                "flagged_a": int(group["flagged_a"].sum()),
                "flagged_b": int(group["flagged_b"].sum()),
                "changed": int((group["flagged_a"] != group["flagged_b"]).sum()),
            }
        )
    summary = pd.DataFrame(rows, columns=["product", "images", "spearman", "flagged_a", "flagged_b", "changed"])
    changed = both[both["flagged_a"] != both["flagged_b"]].drop(columns="image_id")
    changed = changed.sort_values(["product", "path"]).reset_index(drop=True)
    return summary, changed
