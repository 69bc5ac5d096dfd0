"""Stage 2: mutual scoring of every pool with Dask, one task per pair of image blocks.

The upper triangle of block pairs is computed once (one GEMM gives both directions);
each pair writes only its own two chunks of the pool's similarity table and a marker, so
a re-run skips finished pairs. A block's LNAMD tokens are computed once, by the first pair
task that needs them (its diagonal pair, which the block's other pairs wait for), and stored
in the pool store until every pair is done, so the other pair tasks are only GEMMs. Row tasks
then turn a block's similarities into patch scores.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from distributed import Client, Future, as_completed

from .atomic import disk_space_for
from .backbone import resolve_device
from .cluster import dask_client
from .config import CODE_VERSION, MsmParams, ScoringParams
from .core import (
    auto_tile_images,
    block_aggregates,
    block_pair_similarities,
    block_patch_scores,
    neighbour_count,
    split_pool,
)
from .faults import failpoint
from .identity import array_digest, params_key
from .layout import pool_stores_dir
from .locks import exclusive_lock
from .manifests import PoolsRef, TokensRef
from .store import (
    PoolLayout,
    create_pool_store,
    drop_aggregates,
    finish_pool_store,
    is_done,
    mark_done,
    open_block_aggregates,
    open_pool_store,
    pool_is_complete,
    pool_store_intact,
    read_token_rows,
    write_block_aggregates,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PoolJob",
    "aggregate_block",
    "assemble_row_block",
    "locked_pools",
    "open_pool",
    "plan_pool",
    "score_block_pair",
    "score_pools_with_dask",
    "score_products",
    "auto_task_images",
]

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PoolJob:
    """Everything a worker needs to score one pool: where, which token rows, which layout, how."""

    pool_path: str
    token_path: str
    token_rows: tuple[int, ...]  # row of each pool image in the token store, pool order
    layout: PoolLayout
    msm: MsmParams
    backbone_key: str
    device: str = "auto"

    @property
    def settings(self) -> dict:
        """What decides the pool's scores besides its images, as stored in the pool store."""
        return {
            "backbone": self.backbone_key,
            "r_list": list(self.msm.r_list),
            "interval": self.msm.interval,
            "block": self.layout.task_images,  # the key's name from before the sizes were named apart
            "msm_precision": self.msm.precision,
        }


def plan_pool(
    pools_dir: Path,
    image_ids: Sequence[str],
    token_path: str | Path,
    token_rows: Sequence[int],
    *,
    grid: tuple[int, int],
    n_layers: int,
    msm: MsmParams,
    backbone_key: str,
    task_images: int | None = None,
    device: str = "auto",
) -> PoolJob:
    """The job of one pool: its content-addressed store path, its layout and its parameters.

    The store's name is a key of the pool's images, the backbone, the MSM parameters and the
    task block size, so runs of other days over the same images find and share it.
    ``task_images`` (images per Dask task block) defaults to `auto_task_images`.
    """
    ids = tuple(image_ids)
    task_images = task_images or auto_task_images(grid[0] * grid[1], len(ids))
    layout = PoolLayout(image_ids=ids, grid=grid, n_maps=len(msm.r_list) * n_layers, task_images=task_images)
    unnamed = PoolJob("", str(token_path), tuple(token_rows), layout, msm, backbone_key, device)
    key = params_key({"ids": sorted(ids), "settings": unnamed.settings, "code": CODE_VERSION}, length=20)
    return replace(unnamed, pool_path=str(Path(pools_dir) / f"{key}.zarr"))


def open_pool(job: PoolJob, log: logging.Logger = logger) -> None:
    """Create the job's pool store, or keep the one a previous run left unless it is damaged."""
    path = Path(job.pool_path)
    if path.exists() and not pool_store_intact(path):
        log.warning("%s: damaged; computing the pool again", path)
        shutil.rmtree(path)
    create_pool_store(path, job.layout, job.settings)


@contextlib.contextmanager
def locked_pools(jobs: Iterable[PoolJob]) -> Iterator[None]:
    """Hold the lock of every job's pool store while this run creates, checks or fills them.

    Taken in one global order, so two runs sharing pools cannot deadlock.
    """
    with contextlib.ExitStack() as held:
        for path in sorted({job.pool_path for job in jobs}):
            waiting = f"{path} is being computed by another run; waiting for it"
            held.enter_context(exclusive_lock(Path(path).with_suffix(".lock"), waiting_message=waiting))
        yield


def product_pools(tokens: TokensRef, scoring: ScoringParams) -> list[tuple[str, ...]]:
    """A product's pools of image ids: the catalog's fixed pools, or a seeded split by pool size."""
    if tokens.pools is not None:
        present = set(tokens.image_ids)
        return [tuple(i for i in pool if i in present) for pool in tokens.pools]
    split = split_pool(len(tokens.image_ids), scoring.pool_size, seed=scoring.pool_seed)
    return [tuple(tokens.image_ids[i] for i in pool) for pool in split]


def score_products(
    tokens: Sequence[TokensRef],
    scoring: ScoringParams,
    backbone_key: str,
    out_dir: str | Path,
    *,
    dask_address: str | None = None,
    device: str = "auto",
    on_progress: Progress | None = None,
    log: logging.Logger = logger,
) -> tuple[PoolsRef, ...]:
    """Stage 2: MSM patch scores of every pool of every product, block pairs computed on Dask.

    Pool stores are content-addressed, so runs of other days over the same images share
    them: each is locked while this stage creates, checks or fills it. A finished pool store
    whose scores no longer match their checksums is recomputed.
    """
    planned: dict[str, PoolJob] = {}  # a pool listed twice is computed once
    products = []
    for ref in tokens:
        if len(ref.image_ids) < 2:
            continue
        rows = dict(zip(ref.image_ids, ref.token_rows))
        jobs = [
            plan_pool(
                pool_stores_dir(out_dir, backbone_key, ref.product),
                ids,
                ref.store_path,
                [rows[i] for i in ids],
                grid=ref.geometry.grid,
                n_layers=ref.geometry.n_layers,
                msm=scoring.msm,
                backbone_key=backbone_key,
                task_images=scoring.task_images,
                device=device,
            )
            for ids in product_pools(ref, scoring)
        ]
        planned.update((job.pool_path, job) for job in jobs)
        products.append((ref, tuple(job.pool_path for job in jobs)))
    with locked_pools(planned.values()):
        for job in planned.values():
            open_pool(job, log)
        with dask_client(dask_address) as client:
            counts = score_pools_with_dask(list(planned.values()), client, on_progress=on_progress)
    out = []
    for ref, paths in products:
        computed = sum(counts[p][0] for p in paths)
        reused = sum(counts[p][1] for p in paths)
        log.info("%s: %d block pairs computed, %d from cache", ref.product, computed, reused)
        out.append(
            PoolsRef(product=ref.product, tokens=ref, pool_paths=paths, pairs_computed=computed, pairs_reused=reused)
        )
    return tuple(out)


def auto_task_images(n_patches: int, n_images: int) -> int:
    """Images per task block of a pool (one Dask task per pair of task blocks).

    Blocks of about 16384 patches make each pair task several GEMM tiles
    (`nearest_similarities` tiles at its own smaller size, `auto_tile_images`, so memory
    stays bounded) and keep the number of tasks, similarity chunks and stored aggregates
    small; at least 4 blocks per pool leave the workers something to share.
    """
    return max(1, min(auto_tile_images(n_patches, target_rows=16384), -(-n_images // 4)))


def aggregate_block(job: PoolJob, block: int) -> str:
    """Store the LNAMD tokens of task block ``block`` for every (r, layer) map, unless they are stored."""
    name = f"aggregates-{block}"
    pool_path = Path(job.pool_path)
    if is_done(pool_path, name):
        return name
    device = resolve_device(job.device)
    raw = read_token_rows(Path(job.token_path), job.token_rows[job.layout.block_rows(block)])
    with torch.inference_mode():
        layers = [torch.from_numpy(t).to(device) for t in raw]
        maps = (z.cpu().numpy() for z in block_aggregates(layers, job.layout.grid, job.msm.r_list))
        write_block_aggregates(pool_path, block, maps, job.layout.n_maps)
    return name


class _StoredMaps(Sequence):
    """A block's stored aggregates as a sequence of (B, L, C) tensors over their mappings (copied only to a GPU)."""

    def __init__(self, pool_path: Path, block: int, device: torch.device) -> None:
        self._maps = open_block_aggregates(pool_path, block)
        self._device = device

    def __len__(self) -> int:
        return len(self._maps)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self._maps[index]).to(self._device)


def score_block_pair(job: PoolJob, a: int, b: int, *_after: str) -> str:
    """Similarities of image blocks a <= b in both directions, for every (r, layer).

    Aggregates a block first if no task stored its LNAMD tokens yet (on Dask, the diagonal
    pairs (a, a) and (b, b) run before, given as ``_after``, and store them).
    """
    name = f"pair-{a}-{b}"
    pool_path = Path(job.pool_path)
    if is_done(pool_path, name):
        return name
    for block in sorted({a, b}):
        aggregate_block(job, block)
    rows_a, rows_b = job.layout.block_rows(a), job.layout.block_rows(b)
    device = resolve_device(job.device)
    compute_dtype = None if job.msm.precision == "float32" else getattr(torch, job.msm.precision)
    with torch.inference_mode():
        a_to_b, b_to_a = block_pair_similarities(
            _StoredMaps(pool_path, a, device),
            None if a == b else _StoredMaps(pool_path, b, device),
            compute_dtype=compute_dtype,
        )
    # stored with the (r, layer) maps on one axis, r major: (R*Y, N, L, N)
    similarity = open_pool_store(pool_path, "r+")["similarity"]
    with disk_space_for(pool_path / "similarity", 2 * a_to_b.numel() * a_to_b.element_size()):
        similarity[:, rows_a, :, rows_b] = a_to_b.cpu().numpy()
        failpoint("worker-pair")  # crash tests: a worker dies between its two writes
        if a != b:
            similarity[:, rows_b, :, rows_a] = b_to_a.cpu().numpy()
    mark_done(pool_path, name)
    return name


def assemble_row_block(job: PoolJob, a: int, *_after: str) -> str:
    """Patch scores of block a from its row of the similarity table (all pairs done)."""
    name = f"row-{a}"
    pool_path = Path(job.pool_path)
    if is_done(pool_path, name):
        return name
    rows = job.layout.block_rows(a)
    group = open_pool_store(pool_path, "r+")
    similarity = torch.from_numpy(group["similarity"][:, rows])  # (R*Y, Ba, L, N)
    if torch.isnan(similarity).any():
        raise RuntimeError(f"{pool_path}: block {a} has unwritten similarities; a pair task is missing")
    n_layers = job.layout.n_maps // len(job.msm.r_list)
    per_map = similarity.unflatten(0, (len(job.msm.r_list), n_layers))  # (R, Y, Ba, L, N)
    k = neighbour_count(len(job.layout.image_ids), job.msm.interval)
    patch_scores = block_patch_scores(per_map, torch.arange(rows.start, rows.stop), k).numpy()
    with disk_space_for(pool_path / "patch_scores", patch_scores.nbytes):
        group["patch_scores"][rows] = patch_scores
    mark_done(pool_path, name, array_digest(patch_scores))
    return name


def score_pools_with_dask(
    jobs: Sequence[PoolJob],
    client: Client,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    finish: bool = True,
) -> dict[str, tuple[int, int]]:
    """Run every missing pair and row task of the pools.

    Once a pool's pairs are all done its stored aggregates are dropped. Pools run in the
    order given (Dask priorities), so the scratch of few pools is on disk at a time.
    ``finish=False`` leaves the similarity tables in place (not marked complete) for a caller
    that derives more from them (the reference scores) and finishes the stores itself.

    Returns
    -------
    counts : dict of pool path to (pairs computed, pairs reused)
    """
    futures = []
    counts = {}
    pairs_left: dict[str, set[str]] = {}  # pool path -> keys of its pair tasks not finished yet
    for order, job in enumerate(jobs):
        pool_path = Path(job.pool_path)
        n_pairs = job.layout.n_blocks * (job.layout.n_blocks + 1) // 2
        if pool_is_complete(pool_path):
            counts[job.pool_path] = (0, n_pairs)
            continue
        pairs, rows = _submit_pool(client, job, priority=-order)
        counts[job.pool_path] = (len(pairs), n_pairs - len(pairs))
        futures.extend(pairs + rows)
        if pairs:
            pairs_left[job.pool_path] = {future.key for future in pairs}
        else:
            drop_aggregates(pool_path)
    total = len(futures)
    if on_progress:
        on_progress(0, total)
    for done, future in enumerate(as_completed(futures), start=1):
        future.result()  # re-raise a worker's error here, with its traceback
        failpoint("score-task")
        for path, left in list(pairs_left.items()):
            left.discard(future.key)
            if not left:  # the pool's aggregates have served every pair
                drop_aggregates(Path(path))
                del pairs_left[path]
        if on_progress:
            on_progress(done, total)
    for job in jobs:
        if finish and not pool_is_complete(Path(job.pool_path)):
            finish_pool_store(Path(job.pool_path))
    return counts


def _submit_pool(client: Client, job: PoolJob, *, priority: int) -> tuple[list[Future], list[Future]]:
    """Submit a pool's missing pair and row tasks, each pair after the tasks that store its blocks' aggregates.

    A block's diagonal pair stores them; where that pair is done but its aggregates are not
    (a store an earlier version began), one `aggregate_block` task does, so no two tasks write them.
    """
    pool_path = Path(job.pool_path)
    n_blocks = job.layout.n_blocks

    def submit(function, *args):
        return client.submit(function, job, *args, pure=False, priority=priority)

    pairs: dict[tuple[int, int], Future] = {}
    aggregating: dict[int, Future] = {}
    for a in range(n_blocks):
        if not is_done(pool_path, f"pair-{a}-{a}"):
            pairs[a, a] = aggregating[a] = submit(score_block_pair, a, a)
    for a, b in itertools.combinations(range(n_blocks), 2):
        if is_done(pool_path, f"pair-{a}-{b}"):
            continue
        for block in (a, b):
            if block not in aggregating and not is_done(pool_path, f"aggregates-{block}"):
                aggregating[block] = submit(aggregate_block, block)
        pairs[a, b] = submit(score_block_pair, a, b, *[aggregating[i] for i in (a, b) if i in aggregating])
    rows = [
        submit(assemble_row_block, a, *[f for (i, j), f in pairs.items() if a in (i, j)])
        for a in range(n_blocks)
        if not is_done(pool_path, f"row-{a}")
    ]
    return list(pairs.values()), rows
