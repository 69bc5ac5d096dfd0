"""Damaged cache files are detected by their checksums and recomputed, never trusted."""

from datetime import date

import pytest

from flows.score import score_captures
from musc_tasks import tables
from musc_tasks.config import ScoringParams

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*RANDOM weights")]


def frame(out):
    scores = tables.read_table(out / "tables" / "scores").drop(columns=["run_id"])
    return scores.sort_values(["product", "path"]).reset_index(drop=True)


def scribble(path):
    data = bytearray(path.read_bytes())
    for i in range(0, len(data), 7):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_tokens_and_maps_are_recomputed(prefect_api, dask_address, demo_day, tiny_backbone, tmp_path):
    out = tmp_path / "out"

    def run():
        return score_captures(
            input_dir=str(demo_day.input_dir),
            out_dir=str(out),
            run_date=date(2026, 11, 22),
            backbone=tiny_backbone,
            scoring=ScoringParams(task_images=3),
            device="cpu",
            dask_address=dask_address,
        )

    run()
    before = frame(out)
    token_store = sorted((out / "cache" / "tokens").rglob("*.zarr"))[0]
    scribble(sorted((token_store / "layer_01" / "c").rglob("*"))[-1])  # one shard of one block
    pool_store = sorted((out / "cache" / "pools").rglob("*.zarr"))[0]
    scribble(sorted(p for p in (pool_store / "patch_scores" / "c").rglob("*") if p.is_file())[0])

    summary = run()
    assert 0 < summary.images_extracted < len(demo_day.images), "only the damaged block is extracted again"
    assert summary.pairs_computed > 0, "the damaged pool is scored again"
    assert frame(out).equals(before)
