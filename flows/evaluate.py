"""Evaluate on MVTec AD / VisA / BTAD with the paper's metrics, through the nightly stages."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from prefect import flow

from flows.score import score_catalog, token_geometry
from flows.stages import Stages
from musc_tasks.cluster import run_cluster
from musc_tasks.config import PRESETS, BackboneSpec, ReferenceMode, ScoringParams
from musc_tasks.datasets import DEFAULT_RSCIN_K
from musc_tasks.layout import evaluation_dir
from musc_tasks.locks import run_lock
from musc_tasks.preflight import holds_image
from musc_tasks.tasks import catalog_dataset, evaluate_metrics, shot_references


@flow(name="evaluate-dataset")
def evaluate_dataset(
    root: str,
    layout: str,
    out_dir: str,
    categories: tuple[str, ...] | None = None,
    divide_num: int | None = None,
    backbone: BackboneSpec = PRESETS["paper"],
    scoring: ScoringParams | None = None,
    mask_mode: str = "paper",
    run_date: date | None = None,
    device: str = "auto",
    dask_address: str | None = None,
    refresh: bool = False,
    shots: int | None = None,
    seed: int = 0,
    reference_mode: ReferenceMode = "combined",
) -> list[dict]:
    """The paper's metrics of every category's test set, scored through the nightly stages.

    Each category is one pool, or the paper's ``divide_num`` subsets; the metrics are image
    AUROC/AP/F1-max and pixel AUROC/AP/F1-max/AUPRO/PRO per category.

    ``scoring`` defaults to the paper's setting for the layout (RsCIN k 1,8,9 on VisA) with
    the whole category in one pool. Everything goes to ``OUT/evaluation/`` (``layout.evaluation_dir``):
    the metrics to ``tables/metrics/``, the per-image scores, masks and caches beside them.

    ``shots`` K scores each category with K of its normal train images as known-good
    references (drawn with ``seed``; README) in ``reference_mode``; they score, they are never
    scored, and the metric rows record K, the seed and the mode.
    """
    scoring = scoring or ScoringParams(rscin_k=DEFAULT_RSCIN_K[layout], pool_size=100_000)
    out_dir = str(evaluation_dir(Path(out_dir).resolve()))  # never in the production nights' tables
    day = (run_date or date.today()).isoformat()
    stages = Stages(refresh, out_dir=out_dir)
    # A local cluster starts and warms its workers while the dataset is catalogued.
    warm_for = backbone if holds_image(root) else None
    with run_lock(out_dir, day, backbone.key), run_cluster(dask_address, warm_for=warm_for, device=device) as cluster:
        catalog, labels_path = stages.run(
            "catalog",
            catalog_dataset,
            root=root,
            layout=layout,
            categories=categories,
            out_dir=out_dir,
            run_date=day,
            divide_num=divide_num,
        )
        references = None
        if shots:  # idempotent: a set already holding the drawn images is kept as it is
            references = shot_references(
                root=root,
                layout=layout,
                categories=tuple(product.name for product in catalog.products),
                shots=shots,
                seed=seed,
                out_dir=out_dir,
                backbone=backbone,
                device=device,
            )
        _, scored = score_catalog(
            catalog,
            backbone,
            token_geometry(backbone),
            scoring,
            out_dir,
            device,
            cluster.address(),
            stages,
            references=references,
            reference_mode=reference_mode,
        )
        dataset = f"{layout}-{root.rstrip('/').split('/')[-1]}"
        return evaluate_metrics(
            labels_path=labels_path,
            scored=scored,
            dataset=dataset,
            backbone=backbone,
            mask_mode=mask_mode,
            out_dir=out_dir,
            run_id=stages.run_id,
            shots=shots,
            seed=seed if shots else None,
            reference_mode=reference_mode if shots else None,
        )
