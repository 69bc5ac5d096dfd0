"""The nightly job: score one day's captures (catalog -> tokens -> MSM -> RsCIN -> publish)."""

from __future__ import annotations

import time
import uuid
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import State

from musc_tasks.config import PRESETS, BackboneSpec, ScoringParams
from musc_tasks.manifests import RunSummary
from musc_tasks.tasks import catalog_images, extract_tokens, publish_results, rescore_products, score_pools


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
    log = get_run_logger()
    day = ((run_date or date.today()) + timedelta(days=day_offset)).isoformat()
    input_dir = input_dir.replace("{date}", day)
    started_at = datetime.now(timezone.utc).isoformat()
    run_id = _run_id()
    seconds: dict[str, float] = {}

    def stage(name, task, *args, **kwargs):
        began = time.perf_counter()
        state: State = task.with_options(refresh_cache=refresh or None).__call__(*args, **kwargs, return_state=True)
        seconds[name] = time.perf_counter() - began
        return state.result(), state.name == "Cached"

    catalog, _ = stage("catalog", catalog_images, input_dir, out_dir, day)
    tokens, tokens_cached = stage("extract", extract_tokens, catalog, backbone, out_dir, device)
    pools, pools_cached = stage("score", score_pools, tokens, scoring, backbone.key, out_dir, dask_address, device)
    scored, _ = stage("rescore", rescore_products, pools, scoring, backbone.image_size, out_dir)

    extracted = 0 if tokens_cached else sum(t.extracted for t in tokens)
    computed = 0 if pools_cached else sum(p.pairs_computed for p in pools)
    counts = {
        "images_extracted": extracted,
        "images_token_cached": sum(t.extracted + t.reused for t in tokens) - extracted,
        "pairs_computed": computed,
        "pairs_cached": sum(p.pairs_computed + p.pairs_reused for p in pools) - computed,
    }
    summary = publish_results(catalog, scored, backbone, scoring, out_dir, run_id, started_at, seconds, counts)
    create_markdown_artifact(key="score-summary", markdown=summary.as_markdown(), description=f"MuSc run {day}")
    log.info("%d scored, %d flagged, %d failed", summary.n_scored, summary.n_flagged, summary.n_failed)
    return summary


def _run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.get_id() or uuid.uuid4())


if __name__ == "__main__":
    import sys

    score_captures(input_dir=sys.argv[1], out_dir=sys.argv[2])
