"""The nightly job: score one day's captures (catalog -> tokens -> MSM -> RsCIN -> publish)."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.stages import Stages
from musc_tasks.cluster import run_cluster
from musc_tasks.config import PRESETS, BackboneSpec, OutputPolicy, ReferenceMode, ScoringParams, patch_size
from musc_tasks.layout import day_input
from musc_tasks.locks import run_lock
from musc_tasks.manifests import CatalogRef, ProductScoresRef, RunSummary, TokenGeometry
from musc_tasks.preflight import holds_image
from musc_tasks.publish import record_no_input
from musc_tasks.tasks import (
    catalog_images,
    extract_tokens,
    publish_days,
    publish_results,
    rscin_scores,
    score_pools,
    score_references,
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
    outputs: OutputPolicy = OutputPolicy(),
    references: str | None = None,
    reference_mode: ReferenceMode = "combined",
) -> RunSummary:
    """Score one day's captures: every image gets a score, a rank, a mask and a heatmap.

    ``input_dir`` may contain ``{date}``, filled with ``run_date`` (default today) plus
    ``day_offset`` days: the nightly deployment scores yesterday with ``day_offset=-1``.
    ``refresh`` ignores cached task results (the on-disk stores still resume); ``outputs`` sizes
    and encodes the heatmaps.
    ``references`` (a stored set's name or a folder ``DIR/<product>/**``) scores the night
    against known-good images too, in ``reference_mode`` (few-shot, plus or combined; README);
    an empty string, as a deployment templates an unset ``MUSC_REFERENCES``, is none.
    """
    references = references or None
    day = ((run_date or date.today()) + timedelta(days=day_offset)).isoformat()
    # Dask workers have their own working folders: every path that reaches them is absolute
    input_dir, out_dir = str(Path(day_input(input_dir, day)).resolve()), str(Path(out_dir).resolve())
    geometry = token_geometry(backbone)
    stages = Stages(refresh, out_dir=out_dir)
    # A local cluster starts and warms its workers while the catalog runs, if INPUT holds an image file.
    warm_for = backbone if holds_image(input_dir) else None
    with run_lock(out_dir, day, backbone.key), run_cluster(dask_address, warm_for=warm_for, device=device) as cluster:
        catalog = stages.run(
            "catalog",
            catalog_images,
            input_dir=input_dir,
            out_dir=out_dir,
            run_date=day,
            min_side=geometry.patch_size,
        )
        if catalog.n_files == 0:
            # A night without images is an alarm (a failed upload), not a quiet success.
            record_no_input(catalog, backbone, scoring, out_dir, stages.info((), ()))
            raise FileNotFoundError(f"no image in {catalog.input_dir}: nothing to score for {day} (runs row no_input)")
        summary, _ = score_catalog(
            catalog,
            backbone,
            geometry,
            scoring,
            out_dir,
            device,
            cluster.address(),
            stages,
            outputs=outputs,
            references=references,
            reference_mode=reference_mode,
        )
    return summary


def score_catalog(
    catalog: CatalogRef,
    backbone: BackboneSpec,
    geometry: TokenGeometry,
    scoring: ScoringParams,
    out_dir: str,
    device: str,
    dask_address: str,
    stages: Stages,
    *,
    outputs: OutputPolicy = OutputPolicy(),
    references: str | None = None,
    reference_mode: str = "combined",
) -> tuple[RunSummary, tuple[ProductScoresRef, ...]]:
    """The stages after the catalog, shared by the nightly and the evaluation flows.

    ``dask_address``: the run's scheduler (`run_cluster`), which every stage uses.
    """
    tokens = stages.run(
        "extract",
        extract_tokens,
        catalog=catalog,
        backbone=backbone,
        geometry=geometry,
        out_dir=out_dir,
        device=device,
        dask_address=dask_address,
    )
    pools = stages.run(
        "score",
        score_pools,
        tokens=tokens,
        scoring=scoring,
        backbone_key=backbone.key,
        out_dir=out_dir,
        dask_address=dask_address,
        device=device,
    )
    if references:
        pools = stages.run(
            "references",
            score_references,
            pools=pools,
            references=references,
            reference_mode=reference_mode,
            scoring=scoring,
            backbone=backbone,
            out_dir=out_dir,
            dask_address=dask_address,
            device=device,
        )
    scored = stages.run("rscin", rscin_scores, pools=pools, params=scoring.rscin)
    run = stages.info(tokens, pools)
    # The night's signals first, so the report that publish writes can show them.
    alerts = publish_days(
        pools=pools, run_date=catalog.run_date, backbone_key=backbone.key, out_dir=out_dir, run_id=run.run_id
    )
    summary = publish_results(
        catalog=catalog,
        tokens=tokens,
        scored=scored,
        backbone=backbone,
        scoring=scoring,
        out_dir=out_dir,
        run=run,
        outputs=outputs,
        dask_address=dask_address,
    )
    summary = summary.model_copy(update={"alerts": alerts})
    create_markdown_artifact(
        key="score-summary", markdown=summary.as_markdown(), description=f"MuSc run {catalog.run_date}"
    )
    get_run_logger().info("%d scored, %d flagged, %d failed", summary.n_scored, summary.n_flagged, summary.n_failed)
    return summary, scored


def token_geometry(backbone: BackboneSpec) -> TokenGeometry:
    """The backbone's patch size and grid, resolved once per run and carried in the manifests."""
    return TokenGeometry(image_size=backbone.image_size, patch_size=patch_size(backbone), n_layers=len(backbone.layers))


if __name__ == "__main__":
    import sys

    score_captures(input_dir=sys.argv[1], out_dir=sys.argv[2])
