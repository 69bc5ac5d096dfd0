"""Stage 4: masks, heatmaps, region crops and the score, region and run tables of a day, published atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from . import tables
from .atomic import write_atomic
from .catalog import read_records
from .cluster import dask_client
from .config import BackboneSpec, OutputPolicy, ScoringParams
from .faults import failpoint
from .imageio import ImageReadError, bounded_size, read_rgb, read_rgb_reduced
from .layout import maps_store_path
from .manifests import CatalogRef, ImageRecord, ProductScoresRef, RunSummary, TokensRef, TopPart
from .maps import upsample_map
from .render import (
    HEATMAP_FORMATS,
    crop_box,
    empty_mask_png,
    encode_crop,
    encode_image,
    heatmap_legend,
    heatmap_overlay,
    image_mask,
    no_regions,
    region_rows,
    write_png,
)
from .rscin import ProductScores, pool_reference, read_product_scores, threshold_margins
from .store import open_pool_store, pool_layout, write_maps_store

logger = logging.getLogger(__name__)

__all__ = [
    "ProductPlan",
    "ProductRows",
    "finish_product",
    "output_relpath",
    "printable",
    "publish_block",
    "publish_day",
]

VERSIONED_PACKAGES = (
    "musc-pipeline",
    "torch",
    "open-clip-torch",
    "prefect",
    "zarr",
    "dask",
    "distributed",
    "numpy",
    "pyarrow",
)


@dataclass(frozen=True)
class RunInfo:
    """Who ran the day and how: what the run table records beside the counts."""

    run_id: str
    flow_run_id: str | None
    started_at: str  # ISO 8601, UTC
    seconds: Mapping[str, float]  # stage -> seconds, publish excluded
    cache_counts: Mapping[str, int]  # images_extracted, images_token_cached, pairs_computed, pairs_cached


def publish_day(
    catalog: CatalogRef,
    tokens: Sequence[TokensRef],
    scored: Sequence[ProductScoresRef],
    backbone: BackboneSpec,
    scoring: ScoringParams,
    out_dir: str | Path,
    run: RunInfo,
    *,
    outputs: OutputPolicy = OutputPolicy(),
    dask_address: str | None | bool = None,
    on_progress: Callable[[int, int], None] | None = None,
    log: logging.Logger = logger,
) -> tuple[RunSummary, list[dict]]:
    """Publish every product's rows, masks, heatmaps, crops and maps, then the run's row and the report.

    Images are published in blocks of ``PUBLISH_TASK_IMAGES`` as Dask tasks on the cluster
    at ``dask_address`` (None: a local one; False: in this process, one block after the
    other). Every block writes the same bytes wherever it runs, and the tables are assembled
    here in record order, so the results do not depend on the cluster.

    Returns
    -------
    summary : RunSummary
    ranked : list of dict
        Score rows of the scored images, most anomalous first, each with its ``product``.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    records = read_records(catalog)
    by_product = {ref.product: ref for ref in scored}
    reasons = {p.name: p.not_scored_reason for p in catalog.products}
    failed = {image_id: reason for ref in tokens for image_id, reason in ref.failed}
    plans = [
        ProductPlan.make(
            out,
            catalog.run_date,
            product,
            product_records,
            read_product_scores(Path(by_product[product].scores_path)) if product in by_product else None,
            [Path(p) for p in by_product[product].pools.pool_paths] if product in by_product else [],
            backbone_key=backbone.key,
            run_id=run.run_id,
            not_scored_reason=reasons.get(product) or "not scored",
            failed_at_extraction=failed,
            outputs=outputs,
        )
        for product, product_records in sorted(records.items())
    ]
    all_scores, published = [], []
    with contextlib.ExitStack() as stack:
        client = None
        if dask_address is not False and sum(len(p.records) for p in plans) > PUBLISH_TASK_IMAGES:
            client = stack.enter_context(dask_client(dask_address or None))
        for done, (plan, rows) in enumerate(_product_results(plans, client), start=1):
            partition = {"date": catalog.run_date, "product": plan.product}
            for name, schema, table_rows in (
                ("scores", tables.SCORES_SCHEMA, rows.scores),
                ("regions", tables.REGIONS_SCHEMA, rows.regions),
            ):
                tables.publish_partition(
                    out / "tables" / name, partition, backbone.key, tables.to_table(table_rows, schema), schema
                )
            published.append(partition)
            failpoint("publish-product")
            all_scores.extend({**r, "product": plan.product} for r in rows.scores)
            if on_progress:
                on_progress(done, len(plans))
    for name in ("scores", "regions"):
        tables.remove_stale(out / "tables" / name, {"date": catalog.run_date}, backbone.key, published)

    ranked = sorted((r for r in all_scores if r["status"] == "scored"), key=lambda r: (-r["score"], r["path"]))
    seconds = {**run.seconds, "publish": time.perf_counter() - started}
    summary = RunSummary(
        run_id=run.run_id,
        run_date=catalog.run_date,
        out_dir=str(out),
        backbone_key=backbone.key,
        n_images=len(all_scores),
        n_scored=len(ranked),
        n_flagged=sum(1 for r in ranked if r["flagged"]),
        n_failed=sum(1 for r in all_scores if r["status"] == "failed"),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        top=tuple(
            TopPart(
                product=r["product"],
                path=r["path"],
                score=r["score"],
                flagged=r["flagged"],
                margin=r["margin"],
                heatmap_path=str((out / r["heatmap_path"]).absolute()),
            )
            for r in ranked[:10]
        ),
        **run.cache_counts,
    )
    parameters = {"backbone": backbone.model_dump(mode="json"), "scoring": scoring.model_dump(mode="json")}
    run_row = {
        "run_id": run.run_id,
        "flow_run_id": run.flow_run_id,
        "started_at": datetime.fromisoformat(run.started_at),
        "finished_at": datetime.now(timezone.utc),
        "backbone_key": backbone.key,
        "parameters": json.dumps(parameters, sort_keys=True),
        "versions": json.dumps(_package_versions(), sort_keys=True),
        "input_dir": catalog.input_dir,
        "n_images": summary.n_images,
        "n_scored": summary.n_scored,
        "n_flagged": summary.n_flagged,
        "n_failed": summary.n_failed,
        # the RsCIN stage keeps its first column name, so existing run tables stay one schema
        **{f"seconds_{'rescore' if k == 'rscin' else k}": v for k, v in seconds.items()},
        **run.cache_counts,
        "status": "completed",
    }
    runs_table = tables.to_table([run_row], tables.RUNS_SCHEMA)
    tables.publish_partition(
        out / "tables" / "runs", {"date": catalog.run_date}, run.run_id, runs_table, tables.RUNS_SCHEMA
    )
    log.info("published %d rows for %s", len(all_scores), catalog.run_date)
    # matplotlib and the report here, in the flow's process: the workers that import this module never draw one
    from .report import build_day_report

    try:
        report = build_day_report(out, catalog.run_date, backbone.key)
        summary = summary.model_copy(update={"report_path": str(report.path)})
    except Exception:  # noqa: BLE001 - the tables are the night's result; a report can be rebuilt
        day = catalog.run_date
        log.exception("the report for %s was not written; `musc report --date %s` rebuilds it", day, day)
    return summary, ranked


def record_no_input(
    catalog: CatalogRef, backbone: BackboneSpec, scoring: ScoringParams, out_dir: str, run: RunInfo
) -> None:
    """The runs row of a day whose input held no image: ``status`` ``no_input``, every count 0."""
    now = datetime.now(timezone.utc)
    parameters = {"backbone": backbone.model_dump(mode="json"), "scoring": scoring.model_dump(mode="json")}
    row = {
        "run_id": run.run_id,
        "flow_run_id": run.flow_run_id,
        "started_at": datetime.fromisoformat(run.started_at),
        "finished_at": now,
        "backbone_key": backbone.key,
        "parameters": json.dumps(parameters, sort_keys=True),
        "versions": json.dumps(_package_versions(), sort_keys=True),
        "input_dir": catalog.input_dir,
        **dict.fromkeys(("n_images", "n_scored", "n_flagged", "n_failed"), 0),
        **{f"seconds_{stage}": run.seconds.get(stage, 0.0) for stage in ("catalog", "extract", "score", "rescore")},
        "seconds_publish": 0.0,
        **dict.fromkeys(("images_extracted", "images_token_cached", "pairs_computed", "pairs_cached"), 0),
        "status": "no_input",
    }
    tables.publish_partition(
        Path(out_dir) / "tables" / "runs",
        {"date": catalog.run_date},
        run.run_id,
        tables.to_table([row], tables.RUNS_SCHEMA),
        tables.RUNS_SCHEMA,
    )


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


@dataclass(frozen=True)
class ProductRows:
    scores: list[dict]
    regions: list[dict]


def printable(path: str) -> str:
    r"""A file name as valid UTF-8: undecodable bytes become ``\xNN`` (tables need UTF-8)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def output_relpath(
    kind: str, run_date: str, product: str, backbone_key: str, relpath: str, *, keep_suffix: bool, suffix: str = ".png"
) -> str:
    """Where a product image's mask, heatmap or folder of region crops goes, relative to OUT; never outside it.

    The file (or folder, ``suffix=""``) is named by the image's relative path without its
    suffix, or with it (``keep_suffix``) when two images of the product share that stem.
    """
    source = PurePosixPath(printable(relpath))
    if source.is_absolute() or ".." in source.parts:
        raise ValueError(f"relpath {relpath!r} must stay inside its product folder")
    name = source.name + suffix if keep_suffix else source.stem + suffix
    return str(PurePosixPath(kind, run_date, product, backbone_key, *source.parent.parts, name))


PUBLISH_TASK_IMAGES = 8  # images per publish task: a few seconds of work at 5 MP


@dataclass(frozen=True)
class ProductPlan:
    """What every publish task of one product needs, decided once for the whole product.

    The pools' patch-grid maps and reference attributes are read here, once: a task that read
    every pool store of its product itself made a night of many small pools (``--pool-size 30``)
    open each store once per block of 8 images.
    """

    out_dir: Path
    run_date: str
    product: str
    records: tuple[ImageRecord, ...]
    scores: ProductScores | None
    patch_maps: Mapping[str, np.ndarray]  # image id -> (h, w) float16 patch-grid map (`_patch_maps`)
    reference: Mapping[str, str]  # the reference set and mode the pools were scored with (`pool_reference`)
    backbone_key: str
    run_id: str
    not_scored_reason: str | None
    failed_at_extraction: Mapping[str, str]
    outputs: OutputPolicy
    ranks: Mapping[str, int]
    margins: Mapping[str, float | None]  # image id -> margin (None: the product's scores have no spread)
    clashing: frozenset[str]
    small_note: str | None

    @classmethod
    def make(
        cls,
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
        failed_at_extraction: Mapping[str, str] | None = None,
        outputs: OutputPolicy = OutputPolicy(),
    ) -> ProductPlan:
        stems = [PurePosixPath(r.relpath).with_suffix("").as_posix() for r in records]
        small = None
        if scores is not None and len(scores.images) < 5:
            small = (
                f"only {len(scores.images)} distinct images in this product: each is compared with its "
                "single most similar other image (MuSc averages the nearest 30 % of 5 or more)"
            )
        return cls(
            out_dir=Path(out_dir),
            run_date=run_date,
            product=product,
            records=tuple(records),
            scores=scores,
            patch_maps=_patch_maps(pool_paths) if scores is not None else {},
            reference=pool_reference(pool_paths),
            backbone_key=backbone_key,
            run_id=run_id,
            not_scored_reason=not_scored_reason,
            failed_at_extraction=dict(failed_at_extraction or {}),
            outputs=outputs,
            ranks=_ranks(scores),
            margins=_margins(scores),
            clashing=frozenset(s for s in stems if stems.count(s) > 1),
            small_note=small,
        )

    def blocks(self) -> list[tuple[int, int]]:
        """Record index ranges ``[start, stop)`` of the product's publish tasks."""
        n = len(self.records)
        return [(start, min(n, start + PUBLISH_TASK_IMAGES)) for start in range(0, n, PUBLISH_TASK_IMAGES)]


@dataclass(frozen=True)
class BlockRows:
    scores: list[dict]
    regions: list[dict]
    sizes: list[tuple[int, int, int]]  # (record index, height, width) of each published image


def _product_results(plans: Sequence[ProductPlan], client) -> Iterator[tuple[ProductPlan, ProductRows]]:
    """Each product's rows, in product order, its blocks run here or as Dask tasks (all submitted at once)."""
    if client is None:
        for plan in plans:
            yield plan, finish_product(plan, [publish_block(plan, start, stop) for start, stop in plan.blocks()])
        return
    futures = []
    for plan in plans:
        shared = client.scatter(plan, hash=False)  # sent once, not once per block
        futures.append([client.submit(publish_block, shared, start, stop, pure=False) for start, stop in plan.blocks()])
    for plan, product_futures in zip(plans, futures):
        yield plan, finish_product(plan, client.gather(product_futures))
        for future in product_futures:
            future.release()


def finish_product(plan: ProductPlan, blocks: Sequence[BlockRows]) -> ProductRows:
    """Join a product's blocks in record order and write its maps store and legend."""
    if plan.scores is not None:
        sizes = [(plan.records[index], height, width) for block in blocks for index, height, width in block.sizes]
        _write_maps(
            plan.out_dir,
            plan.run_date,
            plan.product,
            plan.backbone_key,
            plan.scores,
            plan.patch_maps,
            sizes,
        )
    return ProductRows(
        scores=[row for block in blocks for row in block.scores],
        regions=[row for block in blocks for row in block.regions],
    )


def publish_block(plan: ProductPlan, start: int, stop: int) -> BlockRows:
    """Masks, heatmaps and region crops of records ``[start, stop)`` of a product, and their rows.

    Duplicates (same content) share their original's scores and rank; every path gets its
    own row, mask, heatmap and crops. Files that could not be read get a row with their reason:
    at cataloguing (the record's), at extraction (``failed_at_extraction``, image id ->
    reason) or here. Each capture is decoded once. Masks and regions come from the float16
    patch-grid map that the maps store keeps, upsampled to the capture's size, so a stored
    map reproduces them exactly: only a flagged image has a mask, cut by ``render.image_mask``.
    Each region gets a crop of the decoded capture (``render.crop_box``); crops a previous run
    of the image left beyond its current regions are removed.
    """
    out_dir, run_date, product, backbone_key, run_id = (
        plan.out_dir,
        plan.run_date,
        plan.product,
        plan.backbone_key,
        plan.run_id,
    )
    scores, outputs = plan.scores, plan.outputs
    by_id = {s.image_id: s for s in (scores.images if scores else ())}
    ranks = plan.ranks
    patch_maps, reference = plan.patch_maps, plan.reference
    heat_suffix = HEATMAP_FORMATS[outputs.heatmap_format]
    score_rows, region_rows_out, sizes = [], [], []
    for index in range(start, stop):
        record = plan.records[index]
        stem = PurePosixPath(record.relpath).with_suffix("").as_posix()
        small = plan.small_note
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
        if record.image_id in plan.failed_at_extraction:
            reason = plan.failed_at_extraction[record.image_id]
            score_rows.append({**row, "status": "failed", "error": f"unreadable at extraction: {reason}"})
            continue
        if scored is None or scores is None:
            score_rows.append({**row, "status": "not_scored", "error": plan.not_scored_reason})
            continue
        keep_suffix = stem in plan.clashing
        mask_rel = output_relpath("masks", run_date, product, backbone_key, record.relpath, keep_suffix=keep_suffix)
        heat_rel = output_relpath(
            "heatmaps", run_date, product, backbone_key, record.relpath, keep_suffix=keep_suffix, suffix=heat_suffix
        )
        crops_rel = output_relpath(
            "crops", run_date, product, backbone_key, record.relpath, keep_suffix=keep_suffix, suffix=""
        )
        flagged = scored.score > scores.image_threshold
        full_size = flagged or ranks[record.image_id] <= outputs.full_resolution_top
        try:
            if full_size:
                image, _ = read_rgb(Path(record.path))
                capture_size = image.size
            else:  # its heatmap is all this image's pixels are for: decoded at a reduced scale
                image, capture_size, _ = read_rgb_reduced(Path(record.path), outputs.long_side)
        except ImageReadError as error:
            score_rows.append({**row, "status": "failed", "error": f"unreadable at publish: {error.reason}"})
            continue
        width, height = capture_size
        patch_map = patch_maps[record.image_id]
        if flagged:
            pixel_scores = upsample_map(patch_map, (height, width))
            mask, rule, level = image_mask(pixel_scores, scores.pixel_threshold, flagged=True)
            regions = region_rows(mask, pixel_scores)
            write_png(_inside(out_dir, mask_rel), np.where(mask, np.uint8(255), np.uint8(0)))
            anomalous_fraction = float(mask.mean())
        else:
            # image_mask's rule: an image that is not flagged has an empty mask and no regions,
            # whatever its map, so its map is not upsampled to the capture's size for them.
            pixel_scores, mask, rule, level, regions = None, None, None, None, no_regions()
            write_atomic(_inside(out_dir, mask_rel), empty_mask_png(height, width))
            anomalous_fraction = 0.0
        overlay = _overlay(
            image, capture_size, patch_map, pixel_scores, mask, regions, scores, outputs, full_size=full_size
        )
        write_atomic(_inside(out_dir, heat_rel), encode_image(overlay, outputs.heatmap_format, outputs.heatmap_quality))
        sizes.append((index, height, width))
        crops = {}
        for index in range(len(regions["region"])):
            region = {name: values[index].item() for name, values in regions.items()}
            bbox = (region["bbox_x0"], region["bbox_y0"], region["bbox_x1"], region["bbox_y1"])
            # cut from the capture decoded above: at full size, as a flagged image's heatmap is
            crops[region["region"]] = encode_crop(np.asarray(image.crop(crop_box(bbox, capture_size))))
            region_rows_out.append(
                {
                    "image_id": record.image_id,
                    "path": printable(record.path),
                    **region,
                    "region_rule": rule,
                    "backbone_key": backbone_key,
                    "run_id": run_id,
                    "crop_path": printable(str(Path(out_dir).absolute() / crops_rel / f"{region['region']}.jpg")),
                }
            )
        _replace_crops(_inside(out_dir, crops_rel), crops)
        score_rows.append(
            {
                **row,
                "score": scored.score,
                "raw_score": scored.raw_score,
                "rank": ranks[record.image_id],
                "flagged": flagged,
                "margin": plan.margins[record.image_id],
                "image_threshold": scores.image_threshold,
                "pixel_threshold": scores.pixel_threshold,
                "pool_index": scored.pool_index,
                "pool_images": scored.pool_images,
                "anomalous_fraction": anomalous_fraction,
                "mask_level": level,
                # Absolute, like the capture's path: a query's result opens as it is (README: Paths in the tables).
                "mask_path": printable(str(Path(out_dir).absolute() / mask_rel)),
                "heatmap_path": printable(str(Path(out_dir).absolute() / heat_rel)),
                "heatmap_min": scores.pixel_threshold,
                "heatmap_max": max(scores.map_max, scores.pixel_threshold),
                "status": "scored",
                **reference,
            }
        )
    return BlockRows(scores=score_rows, regions=region_rows_out, sizes=sizes)


def _replace_crops(folder: Path, crops: Mapping[int, bytes]) -> None:
    """Write an image's crops (region number -> JPEG) and remove the region crops a previous run left beyond them.

    A re-run can find fewer regions in an image (another night's threshold) or none (no longer
    flagged); its crop folder then keeps only the current regions' files. Other entries (a
    subfolder holding the crops of an image in a folder of the same name) are left alone.
    """
    for region, data in crops.items():
        write_atomic(folder / f"{region}.jpg", data)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        stem, _, suffix = entry.name.partition(".")
        if suffix == "jpg" and stem.isascii() and stem.isdigit() and int(stem) not in crops and entry.is_file():
            os.unlink(entry.path)
            logger.info("removed stale crop %s", entry.path)
    if not crops:
        with contextlib.suppress(OSError):  # not empty: it holds another image's crop folder
            folder.rmdir()


def _patch_maps(pool_paths: Sequence[Path]) -> dict[str, np.ndarray]:
    """Every image's patch-grid map, image id -> (h, w) float16: one read per pool store."""
    maps = {}
    for path in pool_paths:
        layout = pool_layout(path)
        patch_scores = np.asarray(open_pool_store(path)["patch_scores"][:], dtype=np.float16)
        for row, image_id in enumerate(layout.image_ids):
            maps[image_id] = patch_scores[row].reshape(layout.grid)
    return maps


def _overlay(
    image: Image.Image,
    capture_size: tuple[int, int],
    patch_map: np.ndarray,
    pixel_scores: np.ndarray | None,
    mask: np.ndarray | None,
    regions: Mapping[str, np.ndarray],
    scores: ProductScores,
    outputs: OutputPolicy,
    *,
    full_size: bool,
) -> np.ndarray:
    """The heatmap of one image: at its size, or with its long side bounded by the policy.

    ``image`` is the capture at ``capture_size`` (width, height) or, for a bounded heatmap, at
    any size from the bounded one up (a reduced decode). ``pixel_scores`` and ``mask`` are at
    the capture's size; None when the image has no mask (the map is then upsampled only to
    the size drawn, and no contour is drawn). A reduced heatmap draws the contour of the
    image's mask reduced (nearest pixel), so it outlines the same pixels as the mask PNG.
    """
    boxes = np.stack([regions[k] for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")], axis=-1)
    floor, vmax = scores.pixel_threshold, scores.map_max
    width, height = capture_size
    size = bounded_size(capture_size, outputs.long_side)
    if full_size or size == capture_size:
        if pixel_scores is None:
            pixel_scores = upsample_map(patch_map, (height, width))
        return heatmap_overlay(np.asarray(image), pixel_scores, floor=floor, vmax=vmax, mask=mask, boxes=boxes)
    scale = outputs.long_side / max(width, height)
    small = np.asarray(image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
    small_scores = upsample_map(patch_map, (size[1], size[0]))
    small_boxes = np.concatenate([np.floor(boxes[:, :2] * scale), np.ceil(boxes[:, 2:] * scale)], axis=1)
    small_mask = None if mask is None else np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return heatmap_overlay(
        small, small_scores, floor=floor, vmax=vmax, mask=small_mask, boxes=small_boxes.astype(np.int64)
    )


def _write_maps(
    out_dir: Path,
    run_date: str,
    product: str,
    backbone_key: str,
    scores: ProductScores,
    patch_maps: Mapping[str, np.ndarray],
    entries: Sequence[tuple[ImageRecord, int, int]],
) -> None:
    """The product's maps store and heatmap legend; one map per distinct image, rows by path."""
    image_ids = sorted({record.image_id for record, _, _ in entries})
    row_of = {image_id: row for row, image_id in enumerate(image_ids)}
    grid = next(iter(patch_maps.values())).shape if patch_maps else (0, 0)
    maps = np.stack([patch_maps[i] for i in image_ids]) if image_ids else np.zeros((0, *grid), np.float16)
    attributes = {
        "date": run_date,
        "product": product,
        "backbone_key": backbone_key,
        "grid": list(grid),
        "pixel_threshold": scores.pixel_threshold,
        "heatmap_min": scores.pixel_threshold,
        "heatmap_max": max(scores.map_max, scores.pixel_threshold),
        "image_ids": image_ids,
        "images": [
            {
                "path": printable(record.path),
                "relpath": printable(record.relpath),
                "image_id": record.image_id,
                "row": row_of[record.image_id],
                "height": height,
                "width": width,
            }
            for record, height, width in sorted(entries, key=lambda e: e[0].relpath)
        ],
    }
    write_maps_store(maps_store_path(out_dir, run_date, product, backbone_key), maps, attributes)
    legend_rel = str(PurePosixPath("heatmaps", run_date, product, backbone_key, "_legend.png"))
    write_png(_inside(out_dir, legend_rel), heatmap_legend(scores.pixel_threshold, scores.map_max))


def _notes(record: ImageRecord) -> list[str]:
    notes = list(record.notes)
    if printable(record.path) != record.path:
        notes.append("file name is not valid UTF-8: undecodable bytes shown as \\xNN")
    if record.duplicate_of:
        notes.append(f"same content as {printable(record.duplicate_of)}: scored once")
    return notes


def _margins(scores: ProductScores | None) -> dict[str, float | None]:
    if scores is None or not scores.images:
        return {}
    margins = threshold_margins(np.array([s.score for s in scores.images]), scores.image_threshold)
    return {s.image_id: None if np.isnan(m) else float(m) for s, m in zip(scores.images, margins)}


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
