"""The nightly job: score one day's captures (catalog -> tokens -> MSM -> RsCIN -> publish)."""

from __future__ import annotations

import time
import uuid
from datetime import date, datetime, timedelta, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from musc_tasks.backbone import patch_size
from musc_tasks.config import PRESETS, BackboneSpec, ScoringParams
from musc_tasks.locks import run_lock
from musc_tasks.manifests import CatalogRef, ProductScoresRef, RunSummary
from musc_tasks.store import store_fingerprint
from musc_tasks.tasks import (
    catalog_images,
    extract_tokens,
    pool_stores_dir,
    publish_results,
    rescore_products,
    score_pools,
    token_stores_dir,
)


@flow(name="score-captures")
def score_captures(
    input_dir: str,
    out_dir: str,
    run_date: date | None = None,
    day_offset: int = 0,
    backbone: BackboneSpec = PRESETS["paper"],
    scoring: ScoringParams = ScoringParams(),
    device: str = "auto",
    dask_address: str | None = None,
    refresh: bool = False,
) -> RunSummary:
    """Score one day's captures: every image gets a score, a rank, a mask and a heatmap.

    ``input_dir`` may contain ``{date}``, filled with ``run_date`` (default today) plus
    ``day_offset`` days: the nightly deployment scores yesterday with ``day_offset=-1``.
    ``refresh`` ignores cached task results (the on-disk stores still resume).
    """
    day = ((run_date or date.today()) + timedelta(days=day_offset)).isoformat()
    stages = Stages(refresh)
    with run_lock(out_dir, day, backbone.key):
        catalog = stages.run(
            "catalog", catalog_images, input_dir.replace("{date}", day), out_dir, day, patch_size(backbone)
        )
        summary, _ = score_catalog(catalog, backbone, scoring, out_dir, device, dask_address, stages)
    return summary


def score_catalog(
    catalog: CatalogRef,
    backbone: BackboneSpec,
    scoring: ScoringParams,
    out_dir: str,
    device: str,
    dask_address: str | None,
    stages: Stages,
) -> tuple[RunSummary, tuple[ProductScoresRef, ...]]:
    """The stages after the catalog, shared by the nightly and the evaluation flows."""
    token_dir, pool_dir = token_stores_dir(out_dir, backbone.key), pool_stores_dir(out_dir, backbone.key)
    tokens = stages.run("extract", extract_tokens, catalog, backbone, out_dir, device, store_fingerprint(token_dir))
    pools = stages.run(
        "score", score_pools, tokens, scoring, backbone.key, out_dir, dask_address, device,
        store_fingerprint(token_dir, pool_dir),
    )
    scored = stages.run("rescore", rescore_products, pools, scoring, backbone.image_size, out_dir)

    extracted = 0 if "extract" in stages.cached else sum(t.extracted for t in tokens)
    computed = 0 if "score" in stages.cached else sum(p.pairs_computed for p in pools)
    counts = {
        "images_extracted": extracted,
        "images_token_cached": sum(t.extracted + t.reused for t in tokens) - extracted,
        "pairs_computed": computed,
        "pairs_cached": sum(p.pairs_computed + p.pairs_reused for p in pools) - computed,
    }
    summary = publish_results(
        catalog, scored, backbone, scoring, out_dir, stages.run_id, stages.started_at, stages.seconds, counts
    )
    create_markdown_artifact(key="score-summary", markdown=summary.as_markdown(), description=f"MuSc run {catalog.run_date}")
    get_run_logger().info("%d scored, %d flagged, %d failed", summary.n_scored, summary.n_flagged, summary.n_failed)
    return summary, scored


class Stages:
    """Runs stage tasks, timing each and noting which were served from Prefect's cache."""

    def __init__(self, refresh: bool = False):
        from prefect.runtime import flow_run

        self.refresh = refresh
        self.run_id = str(flow_run.get_id() or uuid.uuid4())
        self.started_at = datetime.now(timezone.utc).isoformat()
        self.seconds: dict[str, float] = {}
        self.cached: set[str] = set()

    def run(self, name, task, *args):
        began = time.perf_counter()
        state = task.with_options(refresh_cache=self.refresh or None)(*args, return_state=True)
        self.seconds[name] = time.perf_counter() - began
        if state.name == "Cached":
            self.cached.add(name)
        return state.result()


if __name__ == "__main__":
    import sys

    score_captures(input_dir=sys.argv[1], out_dir=sys.argv[2])
