"""benchmarks/whole_run.py's engine half: the in-memory engine scores a tiny night as the stages do.

The benchmark itself runs `musc score` (a Prefect server and a Dask cluster: too slow for the
suite); here the same stage modules run in this process, without Prefect or Dask, on the same
images, and the benchmark's own comparison must find them equal and must fail on a difference.
"""

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest

from musc_tasks.backbone import load_backbone
from musc_tasks.config import ScoringParams
from musc_tasks.extract import extract_tokens_to_store
from musc_tasks.manifests import TokenGeometry
from musc_tasks.rscin import product_scores
from musc_tasks.scoring import open_pool, plan_pool
from musc_tasks.store import token_index

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from msm_stage import stage_in_process  # noqa: E402
from whole_run import SHARD_IMAGES, make_input, night_images, run_engine, score_differences  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights")


def stage_rows(input_dir: Path, work: Path, spec, scoring: ScoringParams) -> pd.DataFrame:
    """The night through the stage modules in this process: token stores, pool stores, RsCIN; score rows."""
    backbone = load_backbone(spec, device="cpu")
    geometry = TokenGeometry(image_size=spec.image_size, patch_size=backbone.patch_size, n_layers=len(spec.layers))
    rows = []
    for product, images in night_images(input_dir).items():
        store = work / f"{product}.zarr"
        extract_tokens_to_store(store, images, lambda: backbone, shard_images=SHARD_IMAGES)
        index = token_index(store)
        ids = tuple(image_id for image_id, _ in images)
        job = plan_pool(
            work / "pools" / product, ids, store, [index[i] for i in ids],
            grid=backbone.grid, n_layers=len(spec.layers), msm=scoring.msm, backbone_key=spec.key, device="cpu",
        )  # fmt: skip
        open_pool(job)
        stage_in_process(job)
        scores = product_scores(product, [Path(job.pool_path)], store, index, geometry=geometry, rscin=scoring.rscin)
        paths = dict(images)
        rows += [
            {
                "path": paths[image.image_id],
                "product": product,
                "status": "scored",
                "raw_score": image.raw_score,
                "score": image.score,
                "image_threshold": scores.image_threshold,
                "pixel_threshold": scores.pixel_threshold,
            }
            for image in scores.images
        ]
    return pd.DataFrame(rows)


def test_engine_scores_a_night_as_the_stages_do(tmp_path, tiny_spec):
    night = argparse.Namespace(products=2, images_per_product=4, resolution=None)
    input_dir, _ = make_input(tmp_path / "night", night)
    scoring = ScoringParams(r_list=(1, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = run_engine(input_dir, tiny_spec, scoring, "cpu")
    assert set(engine.seconds) == {"load", "list", "extract", "score", "rscin"}
    assert len(engine.scores) == 8 and set(engine.thresholds) == {"brick", "coffee"}

    rows = stage_rows(input_dir, tmp_path / "stages", tiny_spec, scoring)
    differences = score_differences(rows, engine)
    assert max(differences.values()) <= 1e-6, differences

    rows.loc[5, "score"] += 1e-4
    with pytest.raises(SystemExit, match="differ from the pipeline's table"):
        score_differences(rows, engine)
    with pytest.raises(SystemExit, match="scored different images"):
        score_differences(rows.drop(index=0), engine)
