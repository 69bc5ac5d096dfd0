"""Stage 2: mutual scoring of every pool with Dask, one task per pair of image blocks.

The upper triangle of block pairs is computed once (one GEMM gives both directions);
each pair writes only its own two chunks of the pool's similarity table and a marker, so
a re-run skips finished pairs. Row tasks then turn a block's similarities into patch scores.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from distributed import Client, LocalCluster, as_completed

from .backbone import resolve_device
from .faults import failpoint
from .core import aggregate_tokens, auto_block_size, average_scores, nearest_similarities, neighbour_count, scores_from_similarities
from .store import (
    finish_pool_store,
    is_done,
    mark_done,
    open_pool_store,
    pool_is_complete,
    pool_layout,
    read_token_rows,
    row_checksum,
)

logger = logging.getLogger(__name__)

__all__ = ["PoolJob", "dask_client", "score_pools_with_dask", "score_block_pair", "assemble_row_block", "task_block_size"]


@dataclass(frozen=True)
class PoolJob:
    """Everything a worker needs to score one pool, as paths and numbers."""

    pool_path: str
    token_path: str
    token_rows: tuple[int, ...]  # row of each pool image in the token store, pool order
    r_list: tuple[int, ...]
    interval: float
    device: str = "auto"
    msm_precision: str = "float32"


@contextlib.contextmanager
def dask_client(address: str | None = None, *, n_workers: int | None = None) -> Iterator[Client]:
    """A client of the cluster at ``address``, or of a LocalCluster started for the block.

    Local workers are processes with one thread each: torch then uses one core per worker
    (Dask sets OMP_NUM_THREADS=1 in its workers) and the GEMMs do not fight over cores.
    """
    if address:
        with Client(address) as client:
            yield client
        return
    import os

    workers = n_workers or max(1, min(os.cpu_count() or 1, 8))
    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, Client(cluster) as client:
        yield client


def task_block_size(n_patches: int, n_images: int) -> int:
    """Images per block of a pool's Dask tasks (one task per pair of blocks).

    A pair task aggregates (LNAMD) the tokens of both its blocks, so each block is aggregated
    once per task it takes part in, n_blocks + 1 times in all: blocks of about 16384 patches
    keep that small next to the GEMMs, which `nearest_similarities` tiles at its own smaller
    size so memory stays bounded. At least 4 blocks per pool leave the workers something to
    share.
    """
    return max(1, min(auto_block_size(n_patches, target_rows=16384), -(-n_images // 4)))


def _block_slice(block: int, block_images: int, n: int) -> slice:
    return slice(block * block_images, min((block + 1) * block_images, n))


def score_block_pair(job: PoolJob, a: int, b: int) -> str:
    """Similarities of image blocks a <= b in both directions, for every (r, layer)."""
    name = f"pair-{a}-{b}"
    pool_path = Path(job.pool_path)
    if is_done(pool_path, name):
        return name
    layout = pool_layout(pool_path)
    n = len(layout.image_ids)
    rows_a = _block_slice(a, layout.block_images, n)
    rows_b = _block_slice(b, layout.block_images, n)
    device = resolve_device(job.device)
    tokens_a = read_token_rows(Path(job.token_path), job.token_rows[rows_a])
    tokens_b = tokens_a if a == b else read_token_rows(Path(job.token_path), job.token_rows[rows_b])
    compute_dtype = None if job.msm_precision == "float32" else getattr(torch, job.msm_precision)
    a_to_b, b_to_a = [], []
    with torch.inference_mode():
        for r in job.r_list:
            for layer_a, layer_b in zip(tokens_a, tokens_b):
                za = aggregate_tokens(torch.from_numpy(layer_a).to(device), layout.grid, r)
                zb = za if a == b else aggregate_tokens(torch.from_numpy(layer_b).to(device), layout.grid, r)
                ab, ba = nearest_similarities(za, zb, compute_dtype=compute_dtype)
                a_to_b.append(ab.cpu())
                b_to_a.append(ba.cpu())
    similarity = open_pool_store(pool_path, "r+")["similarity"]
    similarity[:, rows_a, :, rows_b] = torch.stack(a_to_b).numpy()
    if a != b:
        similarity[:, rows_b, :, rows_a] = torch.stack(b_to_a).numpy()
    mark_done(pool_path, name)
    return name


def assemble_row_block(job: PoolJob, a: int, *_after: str) -> str:
    """Patch scores of block a from its row of the similarity table (all pairs done)."""
    name = f"row-{a}"
    pool_path = Path(job.pool_path)
    if is_done(pool_path, name):
        return name
    layout = pool_layout(pool_path)
    n = len(layout.image_ids)
    rows = _block_slice(a, layout.block_images, n)
    group = open_pool_store(pool_path, "r+")
    similarity = torch.from_numpy(group["similarity"][:, rows])  # (R*Y, Ba, L, N)
    if torch.isnan(similarity).any():
        raise RuntimeError(f"{pool_path}: block {a} has unwritten similarities; a pair task is missing")
    k = neighbour_count(n, job.interval)
    own = torch.arange(rows.start, rows.stop)
    per_map = torch.stack([scores_from_similarities(s, own, k) for s in similarity])  # (R*Y, Ba, L)
    per_map = per_map.reshape(len(job.r_list), -1, *per_map.shape[1:])  # (R, Y, Ba, L)
    patch_scores = average_scores(per_map).numpy()
    group["patch_scores"][rows] = patch_scores
    mark_done(pool_path, name, row_checksum(patch_scores))
    return name


def score_pools_with_dask(
    jobs: Sequence[PoolJob],
    client: Client,
    *,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, tuple[int, int]]:
    """Run every missing pair and row task of the pools.

    Returns
    -------
    counts : dict of pool path to (pairs computed, pairs reused)
    """
    futures = []
    counts = {}
    for job in jobs:
        pool_path = Path(job.pool_path)
        n_blocks = pool_layout(pool_path).n_blocks
        n_pairs = n_blocks * (n_blocks + 1) // 2
        if pool_is_complete(pool_path):
            counts[job.pool_path] = (0, n_pairs)
            continue
        pair_futures: dict[tuple[int, int], object] = {}
        for a in range(n_blocks):
            for b in range(a, n_blocks):
                if not is_done(pool_path, f"pair-{a}-{b}"):
                    pair_futures[a, b] = client.submit(score_block_pair, job, a, b, pure=False)
        counts[job.pool_path] = (len(pair_futures), n_pairs - len(pair_futures))
        futures.extend(pair_futures.values())
        for a in range(n_blocks):
            if is_done(pool_path, f"row-{a}"):
                continue
            after = [f for (i, j), f in pair_futures.items() if a in (i, j)]
            futures.append(client.submit(assemble_row_block, job, a, *after, pure=False))
    total = len(futures)
    if on_progress:
        on_progress(0, total)
    for done, future in enumerate(as_completed(futures), start=1):
        future.result()  # re-raise a worker's error here, with its traceback
        failpoint("score-task")
        if on_progress:
            on_progress(done, total)
    for job in jobs:
        if not pool_is_complete(Path(job.pool_path)):
            finish_pool_store(Path(job.pool_path))
    return counts
