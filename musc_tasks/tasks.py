"""Prefect tasks: the thin adapter between the flows and the stage modules.

Each task calls one stage function (catalog, extract, scoring, rscin, publish, evaluate)
and adds what only Prefect knows: retries, cache policies, the run logger, progress and
table artifacts. Every stage also resumes from its own on-disk markers, so a crashed run
redoes only what is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from . import catalog as catalog_stage
from . import days as days_stage
from . import evaluate as evaluate_stage
from . import extract as extract_stage
from . import publish as publish_stage
from . import reference_scoring as reference_scoring_stage
from . import references as references_stage
from . import rscin as rscin_stage
from . import scoring as scoring_stage
from .atomic import is_disk_full
from .cluster import dask_client
from .config import CODE_VERSION, BackboneSpec, OutputPolicy, RscinParams, ScoringParams
from .faults import failpoint
from .identity import tree_fingerprint
from .layout import pool_stores_dir, token_stores_dir
from .manifests import CatalogRef, PoolsRef, ProductScoresRef, RunSummary, TokenGeometry, TokensRef
from .progress import artifact_key, progress_bar


@dataclass
class StoresUnchanged(CachePolicy):
    """Cache key part: CODE_VERSION and a fingerprint of the stores a task reads and writes.

    A cached result points into the stores, so it is only reused while they stand as the
    run that cached it left them; otherwise the task runs, checks the stores against their
    checksums and redoes what is damaged or missing.
    """

    stores: tuple[str, ...] = ()  # "tokens", "pools"

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str:
        key = inputs["backbone"].key if "backbone" in inputs else inputs.get("backbone_key")
        where = {"tokens": token_stores_dir, "pools": pool_stores_dir}
        dirs = [where[store](inputs["out_dir"], key) for store in self.stores]
        return hash_objects(CODE_VERSION, tree_fingerprint(*dirs))


def _transient_io_error(task, task_run, state) -> bool:
    """Retry a stage only for I/O hiccups (a busy network share), never for bad input or a full disk."""
    try:
        state.result()
    except OSError as error:
        if is_disk_full(error):  # minutes later the disk is as full, and the user waited for nothing
            return False
        return not isinstance(error, (FileNotFoundError, NotADirectoryError, PermissionError))
    except Exception:  # bad input (ImageReadError is a ValueError) or a bug: retrying cannot help
        return False
    return False


@contextmanager
def _reporting(key: str, description: str) -> Iterator[dict[str, Any]]:
    """What a stage gets from Prefect while it runs: ``on_progress`` (bar and artifact) and the run logger ``log``."""
    with progress_bar(key, description) as on_progress:
        yield {"on_progress": on_progress, "log": get_run_logger()}


RETRIES = {"retries": 2, "retry_delay_seconds": [5, 30], "retry_condition_fn": _transient_io_error}
ON_TOKENS = (INPUTS - "dask_address") + TASK_SOURCE + StoresUnchanged(stores=("tokens",))
ON_POOLS = (INPUTS - "dask_address") + TASK_SOURCE + StoresUnchanged(stores=("tokens", "pools"))
ON_INPUTS = INPUTS + TASK_SOURCE + StoresUnchanged()


@task(name="catalog_images", **RETRIES)
def catalog_images(input_dir: str, out_dir: str, run_date: str, min_side: int = 1) -> CatalogRef:
    """Every file of the day: content hash, product, size, readable or why not.

    ``min_side`` is the backbone's patch size: a smaller image has no patch to score.
    """
    found = catalog_stage.scan_input(Path(input_dir), min_side=min_side)
    failpoint("catalog")
    return catalog_stage.catalog_manifest(found, out_dir, run_date, logger=get_run_logger())


@task(name="catalog_dataset")
def catalog_dataset(
    root: str, layout: str, categories: tuple[str, ...] | None, out_dir: str, run_date: str, divide_num: int | None
) -> tuple[CatalogRef, str]:
    """A benchmark's test sets as products, plus a labels file (anomalous?, mask) per image."""
    return evaluate_stage.catalog_dataset(root, layout, categories, out_dir, run_date, divide_num, log=get_run_logger())


@task(name="shot_references", **RETRIES)
def shot_references(
    root: str,
    layout: str,
    categories: tuple[str, ...],
    shots: int,
    seed: int,
    out_dir: str,
    backbone: BackboneSpec,
    device: str = "auto",
) -> str:
    """Few-shot evaluation: each category's ``shots`` seeded train images as a stored reference set."""
    return evaluate_stage.shot_references(
        root, layout, categories, shots, seed, out_dir, backbone, device=device, log=get_run_logger()
    )


@task(name="extract_tokens", cache_policy=ON_TOKENS, persist_result=True, **RETRIES)
def extract_tokens(
    catalog: CatalogRef,
    backbone: BackboneSpec,
    geometry: TokenGeometry,
    out_dir: str,
    device: str = "auto",
    dask_address: str | None = None,
) -> tuple[TokensRef, ...]:
    """Stage 1: tokens of every readable image not already in the backbone's token stores, on Dask."""

    def product_progress(product: str):
        return progress_bar(f"extract-{artifact_key(product)}", f"tokens {product}")

    with dask_client(dask_address) as client:
        return extract_stage.extract_catalog(
            catalog,
            backbone,
            geometry,
            out_dir,
            client,
            device=device,
            progress=product_progress,
            log=get_run_logger(),
        )


@task(name="score_pools", cache_policy=ON_POOLS, persist_result=True, **RETRIES)
def score_pools(
    tokens: tuple[TokensRef, ...],
    scoring: ScoringParams,
    backbone_key: str,
    out_dir: str,
    dask_address: str | None = None,
    device: str = "auto",
) -> tuple[PoolsRef, ...]:
    """Stage 2: MSM patch scores of every pool, block pairs computed on Dask."""
    with _reporting("mutual-scoring", "mutual scoring") as reporting:
        return scoring_stage.score_products(
            tokens, scoring, backbone_key, out_dir, dask_address=dask_address, device=device, **reporting
        )


@task(name="score_references", **RETRIES)
def score_references(
    pools: tuple[PoolsRef, ...],
    references: str,
    reference_mode: str,
    scoring: ScoringParams,
    backbone: BackboneSpec,
    out_dir: str,
    dask_address: str | None = None,
    device: str = "auto",
) -> tuple[PoolsRef, ...]:
    """Stage 2b: the pools scored with a known-good reference set (resumes from its stores)."""
    sets = references_stage.resolve_reference_sets(
        references, [p.product for p in pools], out_dir, backbone, device=device
    )
    with _reporting("reference-scoring", "reference scoring") as reporting:
        return reference_scoring_stage.score_with_references(
            pools, sets, reference_mode, scoring, backbone.key, dask_address=dask_address, device=device, **reporting
        )


@task(name="publish_days", **RETRIES)
def publish_days(
    pools: tuple[PoolsRef, ...], run_date: str, backbone_key: str, out_dir: str, run_id: str
) -> tuple[str, ...]:
    """The night's repeated-defect signals per product (tables/days); returns the alert lines."""
    rows = days_stage.day_rows(pools, run_date, backbone_key, run_id)
    days_stage.publish_days(out_dir, run_date, backbone_key, rows)
    alerts = tuple(days_stage.suspicion_lines(rows))
    for alert in alerts:
        get_run_logger().warning("%s", alert)
    return alerts


@task(name="rscin_scores", cache_policy=ON_INPUTS, persist_result=True, **RETRIES)
def rscin_scores(pools: tuple[PoolsRef, ...], params: RscinParams) -> tuple[ProductScoresRef, ...]:
    """Stage 3: raw image scores, RsCIN over each whole product, thresholds."""
    return rscin_stage.rscin_products(pools, params)


@task(name="publish_results", **RETRIES)
def publish_results(
    catalog: CatalogRef,
    tokens: tuple[TokensRef, ...],
    scored: tuple[ProductScoresRef, ...],
    backbone: BackboneSpec,
    scoring: ScoringParams,
    out_dir: str,
    run: publish_stage.RunInfo,
    outputs: OutputPolicy = OutputPolicy(),
    dask_address: str | None = None,
) -> RunSummary:
    """Stage 4: masks, heatmaps, maps and the score, region and run tables, published atomically."""
    with _reporting("publish", "publish") as reporting:
        summary, ranked = publish_stage.publish_day(
            catalog,
            tokens,
            scored,
            backbone,
            scoring,
            out_dir,
            run,
            outputs=outputs,
            dask_address=dask_address,
            **reporting,
        )
    for product in sorted({r["product"] for r in ranked}):
        best = [r for r in ranked if r["product"] == product][:10]
        create_table_artifact(
            key=f"top-{artifact_key(product)}",
            table=[
                {
                    "rank": r["rank"],
                    "path": r["path"],
                    "score": round(r["score"], 4),
                    "flagged": r["flagged"],
                    "heatmap": r["heatmap_path"],
                }
                for r in best
            ],
            description=f"Most anomalous images of {product} on {catalog.run_date}",
        )
    return summary


@task(name="evaluate_metrics")
def evaluate_metrics(
    labels_path: str,
    scored: tuple[ProductScoresRef, ...],
    dataset: str,
    backbone: BackboneSpec,
    mask_mode: str,
    out_dir: str,
    run_id: str,
    shots: int | None = None,
    seed: int | None = None,
    reference_mode: str | None = None,
) -> list[dict]:
    """The paper's metrics per category and their mean, into tables/metrics/dataset=NAME/."""
    rows = evaluate_stage.metric_rows(
        labels_path,
        scored,
        backbone_key=backbone.key,
        image_size=backbone.image_size,
        mask_mode=mask_mode,
        run_id=run_id,
        shots=shots,
        seed=seed,
        reference_mode=reference_mode,
    )
    evaluate_stage.publish_metrics(rows, dataset, backbone.key, out_dir)
    create_table_artifact(key=f"metrics-{artifact_key(dataset)}", table=rows, description=f"MuSc metrics on {dataset}")
    return rows
