"""Evaluation: a benchmark's test sets as products, and the paper's metrics of their scores."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import tables
from .atomic import write_atomic
from .catalog import catalog_files, catalog_manifest
from .config import BackboneSpec
from .core import image_metrics, pixel_metrics, split_by_type
from .datasets import LAYOUT_HINT, choose_shots, dataset_images, list_categories, train_good_images
from .layout import reference_set_path
from .manifests import CatalogRef, ProductScoresRef
from .preprocess import read_mask, resize_mask
from .references import add_references, read_reference_set, remove_references
from .rscin import patch_score_rows, read_product_scores, score_map
from .store import pool_layout

logger = logging.getLogger(__name__)

__all__ = ["catalog_dataset", "shot_references", "metric_rows", "publish_metrics"]

_COUNTS = ("category", "n_images", "n_anomalous", "pool_size")


def catalog_dataset(
    root: str,
    layout: str,
    categories: Sequence[str] | None,
    out_dir: str,
    run_date: str,
    divide_num: int | None,
    *,
    log: logging.Logger = logger,
) -> tuple[CatalogRef, str]:
    """A benchmark's test sets as products, plus a labels file (anomalous?, mask) per image.

    ``divide_num`` pins the paper's split of each category into subsets stratified by
    defect type; None leaves the split to the scoring parameters' pool size.
    """
    names = tuple(categories or list_categories(Path(root), layout))
    if not names:
        raise FileNotFoundError(f"no {layout} categories under {root}: {LAYOUT_HINT[layout]}")
    images = {name: dataset_images(Path(root), layout, name) for name in names}
    files = [(name, str(i.path.relative_to(root))) for name in names for i in images[name]]
    catalog = catalog_files(Path(root), files)
    ids = {entry.path: entry.image_id for entry in catalog.entries}
    pools = None
    if divide_num:
        pools = {}
        for name in names:
            subsets = split_by_type([i.defect_type for i in images[name]], divide_num)
            pools[name] = tuple(tuple(ids[str(images[name][k].path)] for k in subset) for subset in subsets)
    ref = catalog_manifest(catalog, out_dir, run_date, pools=pools, logger=log)
    labels = {
        name: [
            {
                "image_id": ids[str(i.path)],
                "path": str(i.path),
                "anomalous": i.is_anomalous,
                "mask": str(i.mask_path) if i.mask_path else None,
                "defect_type": i.defect_type,
            }
            for i in images[name]
        ]
        for name in names
    }
    labels_path = Path(ref.catalog_path).with_suffix(".labels.json")
    write_atomic(labels_path, json.dumps(labels, sort_keys=True))
    return ref, str(labels_path)


def shot_references(
    root: str,
    layout: str,
    categories: Sequence[str],
    shots: int,
    seed: int,
    out_dir: str,
    backbone: BackboneSpec,
    *,
    device: str = "auto",
    log: logging.Logger = logger,
) -> str:
    """Each category's few-shot references: ``shots`` train images drawn with ``seed``, stored as a set.

    The set, named ``train-k<shots>-seed<seed>``, holds exactly the drawn images (tokens
    extracted once into the category's token store); its label, recorded in every score and
    metric row, names them by content. Returns the set's name for the scoring stages.
    """
    name = f"train-k{shots}-seed{seed}"
    for category in categories:
        chosen = [
            str(path.resolve()) for path in choose_shots(train_good_images(Path(root), layout, category), shots, seed)
        ]
        if reference_set_path(out_dir, backbone.key, category, name).is_file():
            stored = read_reference_set(out_dir, backbone.key, category, name)
            if sorted(e.source_path for e in stored.entries) == sorted(chosen):
                continue
            remove_references(out_dir, category, backbone.key, name=name)  # the train folder changed: draw again
        stored, problems = add_references(
            out_dir, category, chosen, backbone, name=name, added_by=f"evaluate:train,seed={seed}", device=device
        )
        if problems or len(stored.entries) != shots:
            raise ValueError(
                f"{category}: {shots} train image(s) drawn, {len(stored.entries)} usable as references"
                + (f" ({'; '.join(problems)})" if problems else " (identical files count once)")
            )
        log.info("%s: references %s", category, stored.label)
    return name


def metric_rows(
    labels_path: str,
    scored: Sequence[ProductScoresRef],
    *,
    backbone_key: str,
    image_size: int,
    mask_mode: str,
    run_id: str,
    shots: int | None = None,
    seed: int | None = None,
    reference_mode: str | None = None,
) -> list[dict]:
    """Image AUROC/AP/F1-max and pixel AUROC/AP/F1-max/AUPRO/PRO per category, then their mean.

    With few-shot references every row records ``shots``, ``seed`` and ``reference_mode``, and
    each category's row its ``reference_set`` label, so few-shot tables group by them.
    """
    labels = json.loads(Path(labels_path).read_text())
    size = image_size
    rows = []
    for ref in sorted(scored, key=lambda r: r.product):
        images = labels[ref.product]
        scores = {s.image_id: s for s in read_product_scores(Path(ref.scores_path)).images}
        where = patch_score_rows([Path(p) for p in ref.pools.pool_paths])
        kept = [i for i in images if i["image_id"] in scores]
        anomalous = np.array([i["anomalous"] for i in kept])
        image_level = image_metrics(np.array([scores[i["image_id"]].score for i in kept]), anomalous)
        maps = np.stack([score_map(*where[i["image_id"]], size, size) for i in kept])  # (N, S, S)
        masks = np.stack(
            [
                resize_mask(read_mask(Path(i["mask"])), size, mode=mask_mode)
                if i["mask"]
                else np.zeros((size, size), bool)
                for i in kept
            ]
        )
        pixel_level = pixel_metrics(maps, masks)
        pools = [len(pool_layout(Path(p)).image_ids) for p in ref.pools.pool_paths]
        rows.append(
            {
                "category": ref.product,
                **{f"image_{k}": v for k, v in image_level.items()},
                **{f"pixel_{k}": pixel_level[k] for k in ("auroc", "ap", "f1_max")},
                "aupro": pixel_level["aupro"],
                "pro_musc": pixel_level["pro_musc"],
                "n_images": len(kept),
                "n_anomalous": int(anomalous.sum()),
                "pool_size": max(pools),
                "reference_set": ref.pools.reference_set,
            }
        )
    if rows:
        metric_names = [k for k in rows[0] if k not in (*_COUNTS, "reference_set")]
        rows.append(
            {
                "category": "mean",
                **{k: float(np.nanmean([r[k] for r in rows])) for k in metric_names},
                "n_images": sum(r["n_images"] for r in rows),
                "n_anomalous": sum(r["n_anomalous"] for r in rows),
                "pool_size": max(r["pool_size"] for r in rows),
            }
        )
    setting = {"shots": shots, "seed": seed if shots else None, "reference_mode": reference_mode if shots else None}
    return [
        {**row, "backbone_key": backbone_key, "image_size": size, "mask_mode": mask_mode, "run_id": run_id, **setting}
        for row in rows
    ]


def publish_metrics(rows: list[dict], dataset: str, backbone_key: str, out_dir: str) -> None:
    """The metric rows into ``tables/metrics/dataset=NAME/``, one file per backbone and setting.

    Zero-shot rows go to ``<backbone_key>.parquet``; few-shot rows to
    ``<backbone_key>__<mode>-k<shots>-seed<seed>.parquet``, so every K and seed of a few-shot
    table stays beside the zero-shot one (a rerun of the same setting replaces its file).
    """
    first = rows[0] if rows else {}
    stem = backbone_key
    if first.get("shots"):
        stem = f"{backbone_key}__{first['reference_mode']}-k{first['shots']}-seed{first['seed']}"
    table = tables.to_table(rows, tables.METRICS_SCHEMA)
    tables.publish_partition(
        Path(out_dir) / "tables" / "metrics", {"dataset": dataset}, stem, table, tables.METRICS_SCHEMA
    )
