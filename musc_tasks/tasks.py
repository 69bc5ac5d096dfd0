"""Prefect tasks: one per pipeline stage, small manifests in and out, data on disk.

The only module besides flows/ that imports Prefect. Each task wraps a plain function of
the shell modules (catalog, extract, scoring, rescore, publish); caching is keyed on the
inputs, the task's source and CODE_VERSION, and every stage also resumes from its own
on-disk markers, so a crashed run redoes only what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import quote

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from prefect.context import TaskRunContext
from tqdm.auto import tqdm

from . import tables
from .backbone import load_backbone
from .catalog import catalog_files, scan_input
from .config import CODE_VERSION, BackboneSpec, ScoringParams
from .core import image_metrics, pixel_metrics, split_by_type, split_pool
from .datasets import dataset_images, list_categories
from .extract import extract_tokens_to_store
from .faults import failpoint
from .imageio import ImageReadError
from .locks import exclusive_lock
from .manifests import CatalogRef, PoolsRef, ProductRef, ProductScoresRef, RunSummary, TokensRef
from .preprocess import read_mask, resize_mask
from .publish import ImageRecord, product_rows
from .rescore import patch_score_rows, read_product_scores, rescore_product, score_map, write_product_scores
from .scoring import PoolJob, dask_client, score_pools_with_dask, task_block_size
from .store import (
    PoolLayout,
    atomic_write_text,
    create_pool_store,
    pool_key,
    pool_layout,
    pool_store_intact,
    token_index,
    token_store_layout,
)

CACHED = INPUTS + TASK_SOURCE
CACHED_ANYWHERE = (INPUTS - "dask_address") + TASK_SOURCE

__all__ = [
    "catalog_dataset",
    "catalog_images",
    "evaluate_metrics",
    "extract_tokens",
    "publish_results",
    "rescore_products",
    "score_pools",
]


class _Progress:
    """A CLI progress bar (when MUSC_PROGRESS=1) and a Prefect progress artifact."""

    def __init__(self, key: str, description: str):
        self.description = description
        self.bar = tqdm(desc=description, disable=os.environ.get("MUSC_PROGRESS") != "1", leave=True)
        self.artifact = None
        self.last_percent = -100.0
        if TaskRunContext.get() is not None:
            self.artifact = create_progress_artifact(0.0, key=key, description=description)

    def __call__(self, done: int, total: int) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()
        percent = 100.0 * done / total if total else 100.0
        if self.artifact is not None and (percent - self.last_percent >= 5 or done == total):
            update_progress_artifact(self.artifact, percent)
            self.last_percent = percent

    def close(self) -> None:
        self.bar.close()


def _within_product(relpath: str, product: str) -> str:
    """The catalog's path relative to INPUT, made relative to the product folder."""
    prefix = product + "/"
    return relpath[len(prefix) :] if relpath.startswith(prefix) else relpath


def _segment(name: str) -> str:
    return quote(name, safe="")


def _cache_dir(out_dir: str) -> Path:
    return Path(out_dir) / "cache"


def _transient_io_error(task, task_run, state) -> bool:
    """Retry a stage only for I/O hiccups (a busy network share), never for bad input."""
    try:
        state.result()
    except (ImageReadError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError):
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": _transient_io_error}


@task(name="catalog_images", **RETRIES)
def catalog_images(input_dir: str, out_dir: str, run_date: str, min_side: int = 1) -> CatalogRef:
    """Every file of the day: content hash, product, size, readable or why not.

    ``min_side`` is the backbone's patch size: a smaller image has no patch to score.
    """
    catalog = scan_input(Path(input_dir), min_side=min_side)
    failpoint("catalog")
    return _catalog_ref(catalog, out_dir, run_date)


@task(name="catalog_dataset")
def catalog_dataset(
    root: str, layout: str, categories: tuple[str, ...] | None, out_dir: str, run_date: str, divide_num: int | None
) -> tuple[CatalogRef, str]:
    """A benchmark's test sets as products, plus a labels file (anomalous?, mask) per image."""
    names = categories or tuple(list_categories(Path(root), layout))
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
    ref = _catalog_ref(catalog, out_dir, run_date, pools=pools)
    labels = {
        name: [
            {"image_id": ids[str(i.path)], "path": str(i.path), "anomalous": i.is_anomalous,
             "mask": str(i.mask_path) if i.mask_path else None, "defect_type": i.defect_type}
            for i in images[name]
        ]
        for name in names
    }
    labels_path = Path(ref.catalog_path).with_suffix(".labels.json")
    atomic_write_text(labels_path, json.dumps(labels, sort_keys=True))
    return ref, str(labels_path)


def _catalog_ref(catalog, out_dir: str, run_date: str, *, pools: dict | None = None) -> CatalogRef:
    log = get_run_logger()
    records: dict[str, list[dict]] = {}
    for entry in catalog.entries:
        record = ImageRecord(
            image_id=entry.image_id,
            path=entry.path,
            relpath=_within_product(entry.relpath, entry.product),
            width=entry.width,
            height=entry.height,
            status=entry.status,
            reason=entry.reason,
            notes=tuple(entry.notes),
            duplicate_of=entry.duplicate_of,
        )
        records.setdefault(entry.product, []).append(record.__dict__)
    products = []
    for name in catalog.products:
        images = tuple(sorted({e.image_id: e.path for e in catalog.ok_entries(name)}.items()))
        reason = None
        if len(images) < 2:
            reason = (
                f"product {name!r} has {len(images)} readable image(s); MuSc scores an image "
                "against the other images of its product, so it needs at least 2"
            )
            log.warning(reason)
        elif len(images) < 5:
            log.warning("product %r has only %d images: each image is compared with its nearest other image only", name, len(images))
        products.append(
            ProductRef(
                name=name,
                images=images,
                n_files=len(records[name]),
                not_scored_reason=reason,
                pools=(pools or {}).get(name),
            )
        )
    for name in catalog.empty_products:
        log.warning("product folder %r holds no image files", name)
    body = json.dumps(records, sort_keys=True)
    catalog_path = _cache_dir(out_dir) / "catalogs" / run_date / f"{uuid.uuid5(uuid.NAMESPACE_URL, body).hex}.json"
    atomic_write_text(catalog_path, body)
    failed = sum(1 for e in catalog.entries if e.status != "ok")
    log.info("%d files in %d products, %d unreadable", len(catalog.entries), len(products), failed)
    return CatalogRef(
        input_dir=str(catalog.input_dir),
        run_date=run_date,
        catalog_path=str(catalog_path),
        products=tuple(products),
        empty_products=tuple(catalog.empty_products),
        n_files=len(catalog.entries),
        n_failed=failed,
    )


@task(name="extract_tokens", cache_policy=CACHED, persist_result=True, **RETRIES)
def extract_tokens(
    catalog: CatalogRef,
    backbone: BackboneSpec,
    out_dir: str,
    device: str = "auto",
    store_state: str = "",
    code_version: str = CODE_VERSION,
) -> tuple[TokensRef, ...]:
    """Stage 1: tokens of every readable image not already in the backbone's token stores.

    ``store_state`` (`store_fingerprint` of the token stores) is part of the cache key, so
    a cached result is only reused while the stores it points to are untouched; otherwise
    the task runs, checks every needed block against its checksums, and redoes the damaged.
    """
    log = get_run_logger()
    loaded = []

    def load():
        if not loaded:
            loaded.append(load_backbone(backbone, device=device))
        return loaded[0]

    refs = []
    for product in catalog.products:
        if product.not_scored_reason:
            continue
        store = token_stores_dir(out_dir, backbone.key) / f"{_segment(product.name)}.zarr"
        progress = _Progress(f"extract-{_artifact_key(product.name)}", f"tokens {product.name}")
        try:
            result = extract_tokens_to_store(store, product.images, load, on_progress=progress)
        finally:
            progress.close()
        index = token_index(store)
        kept = tuple(i for i, _ in product.images if i in index)
        log.info("%s: %d extracted, %d from cache", product.name, result.extracted, result.reused)
        refs.append(
            TokensRef(
                product=product.name,
                store_path=str(store),
                image_ids=kept,
                token_rows=tuple(index[i] for i in kept),
                extracted=result.extracted,
                reused=result.reused,
                failed=tuple(sorted(result.failed.items())),
                pools=product.pools,
            )
        )
    return tuple(refs)


@task(name="score_pools", cache_policy=CACHED_ANYWHERE, persist_result=True, **RETRIES)
def score_pools(
    tokens: tuple[TokensRef, ...],
    scoring: ScoringParams,
    backbone_key: str,
    out_dir: str,
    dask_address: str | None = None,
    device: str = "auto",
    store_state: str = "",
    code_version: str = CODE_VERSION,
) -> tuple[PoolsRef, ...]:
    """Stage 2: MSM patch scores of every pool, block pairs computed on Dask.

    Pool stores are content-addressed, so runs of other days over the same images share
    them: each is locked while this task creates, checks or fills it. A finished pool store
    whose scores no longer match their checksums is recomputed.
    """
    log = get_run_logger()
    planned, refs = [], []
    for ref in tokens:
        if len(ref.image_ids) < 2:
            continue
        layout = token_store_layout(Path(ref.store_path))
        length = layout.grid[0] * layout.grid[1]
        rows = dict(zip(ref.image_ids, ref.token_rows))
        if ref.pools is not None:
            pools = [tuple(i for i in pool if i in rows) for pool in ref.pools]
        else:
            pools = [tuple(ref.image_ids[i] for i in pool) for pool in split_pool(len(ref.image_ids), scoring.pool_size, seed=scoring.pool_seed)]
        pool_paths = []
        for ids in pools:
            block = scoring.block_images or task_block_size(length, len(ids))
            settings = {
                "backbone": backbone_key,
                "r_list": list(scoring.r_list),
                "interval": scoring.interval,
                "block": block,
                "msm_precision": scoring.msm_precision,
            }
            path = pool_stores_dir(out_dir, backbone_key) / _segment(ref.product) / f"{pool_key(ids, settings)}.zarr"
            layout_of_pool = PoolLayout(image_ids=ids, grid=layout.grid, n_maps=len(scoring.r_list) * len(layout.layers), block_images=block)
            job = PoolJob(
                pool_path=str(path),
                token_path=ref.store_path,
                token_rows=tuple(rows[i] for i in ids),
                r_list=scoring.r_list,
                interval=scoring.interval,
                device=device,
                msm_precision=scoring.msm_precision,
            )
            planned.append((path, layout_of_pool, settings, job))
            pool_paths.append(str(path))
        refs.append((ref, tuple(pool_paths)))
    progress = _Progress("mutual-scoring", "mutual scoring")
    try:
        with contextlib.ExitStack() as held:
            # One global order of acquisition, so two runs sharing pools cannot deadlock.
            for path in sorted({path for path, *_ in planned}):
                held.enter_context(exclusive_lock(path.with_suffix(".lock"), waiting_message=f"{path} is being computed by another run; waiting for it"))
            jobs = {}
            for path, layout_of_pool, settings, job in planned:
                if path.exists() and not pool_store_intact(path):
                    log.warning("%s: damaged; computing the pool again", path)
                    shutil.rmtree(path)
                create_pool_store(path, layout_of_pool, settings)
                jobs[job.pool_path] = job  # a pool listed twice is computed once
            with dask_client(dask_address) as client:
                counts = score_pools_with_dask(list(jobs.values()), client, on_progress=progress)
    finally:
        progress.close()
    out = []
    for ref, paths in refs:
        computed = sum(counts[p][0] for p in paths)
        reused = sum(counts[p][1] for p in paths)
        log.info("%s: %d block pairs computed, %d from cache", ref.product, computed, reused)
        out.append(PoolsRef(product=ref.product, tokens=ref, pool_paths=paths, pairs_computed=computed, pairs_reused=reused))
    return tuple(out)


@task(name="rescore_products", cache_policy=CACHED, persist_result=True, **RETRIES)
def rescore_products(
    pools: tuple[PoolsRef, ...], scoring: ScoringParams, image_size: int, out_dir: str, code_version: str = CODE_VERSION
) -> tuple[ProductScoresRef, ...]:
    """Stage 3: raw image scores, RsCIN over each whole product, thresholds."""
    refs = []
    for ref in pools:
        scores = rescore_product(
            ref.product,
            [Path(p) for p in ref.pool_paths],
            Path(ref.tokens.store_path),
            dict(zip(ref.tokens.image_ids, ref.tokens.token_rows)),
            image_size=image_size,
            rscin_k=scoring.rscin_k,
            threshold=scoring.threshold,
            pixel_threshold=scoring.pixel_threshold,
        )
        key = pool_key(list(ref.pool_paths), {"rscin_k": list(scoring.rscin_k), "t": str(scoring.threshold), "p": str(scoring.pixel_threshold)})
        path = Path(ref.pool_paths[0]).parent / f"scores-{key}.json"
        write_product_scores(path, scores)
        failpoint("rescore")
        refs.append(ProductScoresRef(product=ref.product, scores_path=str(path), pools=ref))
    return tuple(refs)


@task(name="publish_results", **RETRIES)
def publish_results(
    catalog: CatalogRef,
    scored: tuple[ProductScoresRef, ...],
    backbone: BackboneSpec,
    scoring: ScoringParams,
    out_dir: str,
    run_id: str,
    started_at: str,
    seconds: dict[str, float],
    cache_counts: dict[str, int],
) -> RunSummary:
    """Stage 4: masks, heatmaps and the score, region and run tables, published atomically."""
    log = get_run_logger()
    started = time.perf_counter()
    out = Path(out_dir)
    records = json.loads(Path(catalog.catalog_path).read_text())
    by_product = {ref.product: ref for ref in scored}
    reasons = {p.name: p.not_scored_reason for p in catalog.products}
    all_scores, published = [], []
    progress = _Progress("publish", "publish")
    try:
        for done, (product, product_records) in enumerate(sorted(records.items()), start=1):
            ref = by_product.get(product)
            rows = product_rows(
                out,
                catalog.run_date,
                product,
                [ImageRecord(**{**r, "notes": tuple(r["notes"])}) for r in product_records],
                read_product_scores(Path(ref.scores_path)) if ref else None,
                [Path(p) for p in ref.pools.pool_paths] if ref else [],
                backbone_key=backbone.key,
                run_id=run_id,
                not_scored_reason=reasons.get(product) or "not scored",
            )
            partition = {"date": catalog.run_date, "product": product}
            tables.publish_partition(out / "tables" / "scores", partition, backbone.key, tables.to_table(rows.scores, tables.SCORES_SCHEMA), tables.SCORES_SCHEMA)
            tables.publish_partition(out / "tables" / "regions", partition, backbone.key, tables.to_table(rows.regions, tables.REGIONS_SCHEMA), tables.REGIONS_SCHEMA)
            published.append(partition)
            failpoint("publish-product")
            all_scores.extend({**r, "product": product} for r in rows.scores)
            progress(done, len(records))
    finally:
        progress.close()
    for name in ("scores", "regions"):
        tables.remove_stale(out / "tables" / name, {"date": catalog.run_date}, backbone.key, published)

    scored_rows = [r for r in all_scores if r["status"] == "scored"]
    top = sorted(scored_rows, key=lambda r: (-r["score"], r["path"]))
    seconds = {**seconds, "publish": time.perf_counter() - started}
    summary = RunSummary(
        run_id=run_id,
        run_date=catalog.run_date,
        out_dir=str(out),
        backbone_key=backbone.key,
        n_images=len(all_scores),
        n_scored=len(scored_rows),
        n_flagged=sum(1 for r in scored_rows if r["flagged"]),
        n_failed=sum(1 for r in all_scores if r["status"] == "failed"),
        seconds={k: round(v, 3) for k, v in seconds.items()},
        top=tuple((r["product"], r["path"], r["score"]) for r in top[:10]),
        **cache_counts,
    )
    run_row = {
        "run_id": run_id,
        "flow_run_id": _flow_run_id(),
        "started_at": datetime.fromisoformat(started_at),
        "finished_at": datetime.now(timezone.utc),
        "backbone_key": backbone.key,
        "parameters": json.dumps({"backbone": backbone.model_dump(mode="json"), "scoring": scoring.model_dump(mode="json")}, sort_keys=True),
        "versions": json.dumps(_package_versions(), sort_keys=True),
        "input_dir": catalog.input_dir,
        "n_images": summary.n_images,
        "n_scored": summary.n_scored,
        "n_flagged": summary.n_flagged,
        "n_failed": summary.n_failed,
        **{f"seconds_{k}": v for k, v in seconds.items()},
        **cache_counts,
        "status": "completed",
    }
    tables.publish_partition(out / "tables" / "runs", {"date": catalog.run_date}, run_id, tables.to_table([run_row], tables.RUNS_SCHEMA), tables.RUNS_SCHEMA)
    if TaskRunContext.get() is not None:
        for product in sorted({r["product"] for r in scored_rows}):
            best = [r for r in top if r["product"] == product][:10]
            create_table_artifact(
                key=f"top-{_artifact_key(product)}",
                table=[{"rank": r["rank"], "path": r["path"], "score": round(r["score"], 4), "flagged": r["flagged"], "heatmap": r["heatmap_path"]} for r in best],
                description=f"Most anomalous images of {product} on {catalog.run_date}",
            )
    log.info("published %d rows for %s", len(all_scores), catalog.run_date)
    return summary


def _artifact_key(name: str) -> str:
    # Prefect artifact keys: lowercase letters, digits and dashes only
    cleaned = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return (cleaned or "product")[:40] + "-" + uuid.uuid5(uuid.NAMESPACE_URL, name).hex[:6]


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    run = flow_run.get_id()
    return str(run) if run else None


def _package_versions() -> dict[str, str]:
    versions = {}
    for name in ("musc-pipeline", "torch", "open-clip-torch", "prefect", "zarr", "dask", "distributed", "numpy", "pyarrow"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


@task(name="evaluate_metrics")
def evaluate_metrics(
    labels_path: str,
    scored: tuple[ProductScoresRef, ...],
    dataset: str,
    backbone: BackboneSpec,
    mask_mode: str,
    out_dir: str,
    run_id: str,
) -> list[dict]:
    """The paper's metrics per category and their mean, into tables/metrics/dataset=NAME/."""
    labels = json.loads(Path(labels_path).read_text())
    size = backbone.image_size
    rows = []
    for ref in sorted(scored, key=lambda r: r.product):
        images = labels[ref.product]
        scores = {s.image_id: s for s in read_product_scores(Path(ref.scores_path)).images}
        where = patch_score_rows([Path(p) for p in ref.pools.pool_paths])
        kept = [i for i in images if i["image_id"] in scores]
        anomalous = np.array([i["anomalous"] for i in kept])
        image_level = image_metrics(np.array([scores[i["image_id"]].score for i in kept]), anomalous)
        maps = np.stack([score_map(*where[i["image_id"]], size, size) for i in kept])  # (N, S, S)
        masks = np.stack([
            resize_mask(read_mask(Path(i["mask"])), size, mode=mask_mode) if i["mask"] else np.zeros((size, size), bool)
            for i in kept
        ])
        pixel_level = pixel_metrics(maps, masks)
        pools = [len(pool_layout(Path(p)).image_ids) for p in ref.pools.pool_paths]
        rows.append({
            "category": ref.product,
            **{f"image_{k}": v for k, v in image_level.items()},
            **{f"pixel_{k}": pixel_level[k] for k in ("auroc", "ap", "f1_max")},
            "aupro": pixel_level["aupro"],
            "pro_musc": pixel_level["pro_musc"],
            "n_images": len(kept),
            "n_anomalous": int(anomalous.sum()),
            "pool_size": max(pools),
        })
    metric_names = [k for k in rows[0] if k not in ("category", "n_images", "n_anomalous", "pool_size")] if rows else []
    if rows:
        rows.append({
            "category": "mean",
            **{k: float(np.nanmean([r[k] for r in rows])) for k in metric_names},
            "n_images": sum(r["n_images"] for r in rows),
            "n_anomalous": sum(r["n_anomalous"] for r in rows),
            "pool_size": max(r["pool_size"] for r in rows),
        })
    for row in rows:
        row.update(backbone_key=backbone.key, image_size=size, mask_mode=mask_mode, run_id=run_id)
    tables.publish_partition(
        Path(out_dir) / "tables" / "metrics", {"dataset": dataset}, backbone.key,
        tables.to_table(rows, tables.METRICS_SCHEMA), tables.METRICS_SCHEMA,
    )
    if TaskRunContext.get() is not None:
        create_table_artifact(key=f"metrics-{_artifact_key(dataset)}", table=rows, description=f"MuSc metrics on {dataset}")
    return rows


def token_stores_dir(out_dir: str, backbone_key: str) -> Path:
    return _cache_dir(out_dir) / "tokens" / backbone_key


def pool_stores_dir(out_dir: str, backbone_key: str) -> Path:
    return _cache_dir(out_dir) / "pools" / backbone_key
