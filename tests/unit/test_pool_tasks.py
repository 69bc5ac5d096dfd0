"""The Dask worker functions of mutual scoring: precision option, block sizes, agreement with the core."""

import contextlib
import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from distributed import Client
from pydantic import ValidationError

from musc_tasks import scoring
from musc_tasks.atomic import DiskFull
from musc_tasks.cli import build_parser, scoring_from_args
from musc_tasks.config import MsmParams, ScoringParams
from musc_tasks.core import aggregate_tokens, block_aggregates, pool_patch_scores
from musc_tasks.scoring import (
    assemble_row_block,
    auto_task_images,
    open_pool,
    plan_pool,
    score_block_pair,
    score_pools_with_dask,
)
from musc_tasks.store import (
    TokenLayout,
    create_pool_store,
    drop_aggregates,
    finish_pool_store,
    open_block_aggregates,
    open_pool_store,
    pool_layout,
    pool_store_intact,
    prepare_token_store,
    read_token_rows,
    token_index,
    token_store_layout,
    write_token_block,
)

from ..tmpfs import small_tmpfs

GRID, CHANNELS, LAYERS, R_LIST, N, BLOCK = (4, 4), 16, (0, 1), (1, 3), 5, 2


def test_cli_passes_the_precision_to_the_scoring_params():
    args = build_parser().parse_args(["score", "in", "--out", "o", "--msm-precision", "bfloat16"])
    assert scoring_from_args(args).msm_precision == "bfloat16"
    assert scoring_from_args(build_parser().parse_args(["score", "in", "--out", "o"])).msm_precision == "float32"


def test_cli_defaults_are_the_parameter_models_defaults():
    for command in (
        ["score", "in", "--out", "o"],
        ["backfill", "--from", "d", "--to", "d", "--input-root", "{date}", "--out", "o"],
    ):
        assert scoring_from_args(build_parser().parse_args(command)) == ScoringParams()


def test_unknown_precision_is_refused():
    with pytest.raises(ValidationError):
        ScoringParams(msm_precision="int8")


@pytest.fixture
def token_store(tmp_path):
    path = tmp_path / "tokens.zarr"
    layout = TokenLayout(layers=LAYERS, grid=GRID, channels=CHANNELS, embed_dim=4, shard_images=N)
    group = prepare_token_store(path, layout, N)
    rng = np.random.default_rng(0)
    common = rng.standard_normal((1, GRID[0] * GRID[1], CHANNELS), dtype=np.float32)
    tokens = [common + 0.5 * rng.standard_normal((N, GRID[0] * GRID[1], CHANNELS), dtype=np.float32) for _ in LAYERS]
    write_token_block(group, path, 0, [f"i{k}" for k in range(N)], tokens, np.zeros((N, 4), np.float32))
    return path


def test_a_grown_token_store_keeps_its_blocks_without_a_warning(token_store):
    """Growing a store that has block records (a later night) warns nothing and keeps every row."""
    before = read_token_rows(token_store, range(N))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Zarr warned about the records folder when listing the group
        group = prepare_token_store(token_store, token_store_layout(token_store), 2 * N)
    assert [group[name].shape[0] for name in ("layer_00", "layer_01", "embeddings")] == [2 * N] * 3
    assert token_index(token_store) == {f"i{k}": k for k in range(N)}
    for kept, stored in zip(before, read_token_rows(token_store, range(N))):
        np.testing.assert_array_equal(kept, stored)


def worker_scores(tmp_path, token_path, precision):
    """Patch scores as the Dask workers compute them, every pair then every row."""
    index = token_index(token_path)
    ids = tuple(sorted(index))
    msm = MsmParams(r_list=R_LIST, interval=0.3, precision=precision)
    job = plan_pool(
        tmp_path / precision,
        ids,
        token_path,
        [index[i] for i in ids],
        grid=GRID,
        n_layers=len(LAYERS),
        msm=msm,
        backbone_key="test",
        task_images=BLOCK,
        device="cpu",
    )
    open_pool(job)
    n_blocks = -(-N // BLOCK)
    for a in range(n_blocks):
        for b in range(a, n_blocks):
            score_block_pair(job, a, b)
    for a in range(n_blocks):
        assemble_row_block(job, a)
    return open_pool_store(Path(job.pool_path))["patch_scores"][:]


@pytest.mark.parametrize("precision, atol", [("float32", 1e-6), ("bfloat16", 1e-2), ("float16", 2e-3)])
def test_workers_score_like_the_core_engine_at_each_precision(tmp_path, token_store, precision, atol):
    tokens = [torch.from_numpy(t) for t in read_token_rows(token_store, range(N))]
    dtype = None if precision == "float32" else getattr(torch, precision)
    expected = pool_patch_scores(tokens, GRID, R_LIST, tile=BLOCK, compute_dtype=dtype).numpy()
    got = worker_scores(tmp_path, token_store, precision)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)  # same arithmetic as the engine
    exact = pool_patch_scores([t.double() for t in tokens], GRID, R_LIST).numpy()
    np.testing.assert_allclose(got, exact, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "n_patches, n_images", [(1369, 200), (1024, 200), (64, 200), (256, 10), (1369, 2), (20000, 50)]
)
def test_task_blocks_are_large_but_leave_work_to_share(n_patches, n_images):
    block = auto_task_images(n_patches, n_images)
    assert block >= 1
    assert block == 1 or block * n_patches <= 16384  # two aggregated blocks stay ~100 MB at C = 1024
    assert block <= -(-n_images // 4)  # at least 4 blocks: 10 pair tasks for the workers
    if n_patches == 1369 and n_images == 200:
        assert block == 11  # 190 pair tasks and their chunks rather than 5050 with GEMM-sized blocks


def _rename_attribute(path: Path, new: str, old: str) -> None:
    """Make a store look as an older version wrote it: ``new`` stored as ``old``."""
    group = zarr.open_group(path, mode="r+")
    attrs = dict(group.attrs)
    attrs[old] = attrs.pop(new)
    group.attrs.clear()
    group.attrs.update(attrs)


def test_stores_written_with_the_old_block_images_attribute_still_open(tmp_path, token_store):
    """Token and pool stores name their sizes shard_images and task_images; older ones said block_images."""
    layout = token_store_layout(token_store)
    _rename_attribute(token_store, "shard_images", "block_images")
    assert "shard_images" not in zarr.open_group(token_store, mode="r").attrs
    assert token_store_layout(token_store) == layout
    before = worker_scores(tmp_path / "new", token_store, "float32")  # reads and extends the old store

    job_path = next((tmp_path / "new" / "float32").glob("*.zarr"))
    pool = pool_layout(job_path)
    _rename_attribute(job_path, "task_images", "block_images")
    assert pool_layout(job_path) == pool and pool.task_images == BLOCK
    finish_pool_store(job_path)
    assert pool_store_intact(job_path)  # row checksums found through the old name
    again = worker_scores(tmp_path / "new", token_store, "float32")  # same key: the old pool store is reused
    np.testing.assert_array_equal(again, before)
    assert ScoringParams(block_images=3).task_images == 3  # saved deployments and configs keep their meaning


def _pool_job(tmp_path, token_path):
    index = token_index(token_path)
    ids = tuple(sorted(index))
    job = plan_pool(
        tmp_path,
        ids,
        token_path,
        [index[i] for i in ids],
        grid=GRID,
        n_layers=len(LAYERS),
        msm=MsmParams(r_list=R_LIST, interval=0.3, precision="float32"),
        backbone_key="test",
        task_images=BLOCK,
        device="cpu",
    )
    open_pool(job)
    return job


def test_each_block_is_aggregated_once_and_its_stored_tokens_are_lnamds_bits(tmp_path, token_store, monkeypatch):
    job = _pool_job(tmp_path, token_store)
    path = Path(job.pool_path)
    calls = []
    monkeypatch.setattr(scoring, "block_aggregates", lambda *a: calls.append(a) or block_aggregates(*a))
    n_blocks = job.layout.n_blocks
    for a, b in [(a, a) for a in range(n_blocks)] + list(itertools.combinations(range(n_blocks), 2)):
        score_block_pair(job, a, b)
    assert len(calls) == n_blocks  # once per block, not once per pair it is in
    tokens = [torch.from_numpy(t) for t in read_token_rows(token_store, range(N))]
    for block in range(n_blocks):
        rows = job.layout.block_rows(block)
        expected = [aggregate_tokens(tokens[y][rows], GRID, r).numpy() for r in R_LIST for y in range(len(LAYERS))]
        np.testing.assert_array_equal(np.stack(list(open_block_aggregates(path, block))), np.stack(expected))

    drop_aggregates(path)  # as after a run's last pair: markers and arrays gone
    assert not list((path / "done").glob("aggregates-*")) and not (path / "aggregates").exists()
    for a in range(n_blocks):
        assemble_row_block(job, a)
    expected = pool_patch_scores(tokens, GRID, R_LIST, tile=BLOCK).numpy()
    np.testing.assert_allclose(open_pool_store(path)["patch_scores"][:], expected, atol=1e-6, rtol=0)


def test_dask_resumes_a_pool_whose_diagonal_pairs_are_done_but_aggregates_are_not(tmp_path, token_store):
    """An interrupted store without stored aggregates (dropped, or an older version's) still scores like the engine."""
    job = _pool_job(tmp_path, token_store)
    path = Path(job.pool_path)
    for a in range(job.layout.n_blocks):
        score_block_pair(job, a, a)
    drop_aggregates(path)
    create_pool_store(path, job.layout, job.settings)  # the next run opens it again
    free_http = {"dashboard_address": "127.0.0.1:0"}  # the scheduler's HTTP on a free port: no 8787 warning
    with Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None, scheduler_kwargs=free_http
    ) as client:
        counts = score_pools_with_dask([job], client)
    n_blocks = job.layout.n_blocks
    assert counts[job.pool_path] == (n_blocks * (n_blocks - 1) // 2, n_blocks)
    got = open_pool_store(path)["patch_scores"][:]
    np.testing.assert_array_equal(got, worker_scores(tmp_path / "in-one-go", token_store, "float32"))
    assert pool_store_intact(path) and not (path / "aggregates").exists() and not (path / "similarity").exists()


def test_an_older_versions_zarr_aggregates_are_dropped_and_made_again(tmp_path, token_store):
    """A store interrupted by a version that kept the aggregates as a Zarr group resumes to the engine's scores."""
    job = _pool_job(tmp_path, token_store)
    path = Path(job.pool_path)
    for a in range(job.layout.n_blocks):
        score_block_pair(job, a, a)
    zarr.open_group(path / "aggregated", mode="w")  # what that version left: its group, and markers for it
    assert list((path / "done").glob("aggregates-*"))
    create_pool_store(path, job.layout, job.settings)  # the next run opens it
    assert not list((path / "done").glob("aggregates-*")) and not (path / "aggregated").exists()
    for a, b in itertools.combinations(range(job.layout.n_blocks), 2):
        score_block_pair(job, a, b)  # aggregates each block again
    for a in range(job.layout.n_blocks):
        assemble_row_block(job, a)
    np.testing.assert_array_equal(
        open_pool_store(path)["patch_scores"][:], worker_scores(tmp_path / "in-one-go", token_store, "float32")
    )


def test_stored_aggregates_are_mapped_and_a_full_disk_is_reported(tmp_path, token_store):
    """Pair tasks map the aggregates file; writing it onto a full disk names the file and leaves no marker."""
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        job = _pool_job(disk, token_store)
        path = Path(job.pool_path)
        score_block_pair(job, 0, 0)
        stored = open_block_aggregates(path, 0)
        assert stored.shape == (len(R_LIST) * len(LAYERS), BLOCK, GRID[0] * GRID[1], CHANNELS)
        maps = list(stored)
        assert all(isinstance(values, np.memmap) and values.dtype == np.float32 for values in maps)
        assert [values.shape for values in maps] == [stored.shape[1:]] * len(stored)
        map_bytes = maps[0].nbytes  # each map its own mapping, so a task holds the pages of the maps it uses
        assert [values.offset - maps[0].offset for values in maps] == [i * map_bytes for i in range(len(maps))]
        assert stored.file.stat().st_size == maps[0].offset + len(maps) * map_bytes
        del stored, maps
        with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as filler:
            while True:  # until the disk is full
                filler.write(b"\0" * 4096)
        with pytest.raises(DiskFull, match="aggregates/000001.npy"):
            scoring.aggregate_block(job, 1)
        assert not (path / "done" / "aggregates-1").exists()
