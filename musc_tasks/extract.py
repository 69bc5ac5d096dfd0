"""Stage 1: per-layer ViT tokens of every image, streamed block by block into Zarr."""

from __future__ import annotations

import contextlib
import functools
import logging
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from distributed import Client, Future, as_completed

from .atomic import write_atomic
from .backbone import Backbone, load_backbone
from .config import BackboneSpec
from .faults import failpoint
from .layout import token_store_path
from .loading import PixelBlock, load_blocks
from .locks import exclusive_lock
from .manifests import CatalogRef, TokenGeometry, TokensRef
from .store import (
    TokenLayout,
    drop_damaged_blocks,
    next_free_block,
    open_token_store,
    prepare_token_store,
    token_index,
    write_token_block,
)

logger = logging.getLogger(__name__)

__all__ = ["ExtractResult", "extract_blocks_task", "extract_catalog", "extract_tokens_to_store", "worker_backbone"]

Progress = Callable[[int, int], None]
# product -> a context manager yielding that product's progress callback
ProductProgress = Callable[[str], AbstractContextManager[Progress | None]]


def _no_progress(product: str) -> AbstractContextManager[None]:
    return nullcontext()


def extract_catalog(
    catalog: CatalogRef,
    backbone: BackboneSpec,
    geometry: TokenGeometry,
    out_dir: str | Path,
    client: Client,
    *,
    device: str = "auto",
    shard_images: int = 8,
    progress: ProductProgress = _no_progress,
    log: logging.Logger = logger,
) -> tuple[TokensRef, ...]:
    """Stage 1: tokens of every readable image not already in the backbone's token stores.

    One Dask task per (product, block of images), products side by side; each task writes
    its own shard and record. Workers load the backbone once (`worker_backbone`); on a
    cluster whose workers declare a ``GPU`` resource, only those run extraction.
    """
    products = [p for p in catalog.products if not p.not_scored_reason]
    stores = {p.name: token_store_path(out_dir, backbone.key, p.name) for p in products}
    with contextlib.ExitStack() as held:
        # One global order of acquisition, as for the pool stores: two runs cannot deadlock.
        for name in sorted(stores):
            waiting = f"another run is writing tokens to {stores[name]}; waiting for it"
            held.enter_context(exclusive_lock(stores[name].with_suffix(".lock"), waiting_message=waiting))
        callbacks = {p.name: held.enter_context(progress(p.name)) for p in products}
        plans = {p.name: plan_extraction(stores[p.name], p.images, shard_images) for p in products}
        done = run_extraction_tasks(client, plans, backbone, geometry, device, callbacks)
    refs = []
    for product in products:
        plan, (extracted, failed) = plans[product.name], done[product.name]
        index = token_index(stores[product.name])
        kept = tuple(i for i, _ in product.images if i in index)
        log.info("%s: %d extracted, %d from cache", product.name, extracted, plan.reused)
        refs.append(
            TokensRef(
                product=product.name,
                store_path=str(stores[product.name]),
                geometry=geometry,
                image_ids=kept,
                token_rows=tuple(index[i] for i in kept),
                extracted=extracted,
                reused=plan.reused,
                failed=tuple(sorted(failed.items())),
                pools=product.pools,
            )
        )
    return tuple(refs)


@dataclass(frozen=True)
class ExtractionPlan:
    """The blocks one product still needs: (block index, [(image id, path)]) each, and the rows to size for."""

    store_path: Path
    blocks: tuple[tuple[int, tuple[tuple[str, str], ...]], ...]
    rows: int
    shard_images: int
    reused: int
    writer: str  # this run's token in the store's writer file (see `extract_blocks_task`)


def plan_extraction(store_path: Path, images: Sequence[tuple[str, str]], shard_images: int) -> ExtractionPlan:
    """Check the store, then number the blocks of the missing images from its first free block.

    The caller holds the store's lock until every planned block is written.
    """
    wanted = dict(images)  # duplicates of one content share one row
    drop_damaged_blocks(store_path, list(wanted))
    have = token_index(store_path)
    missing = [(image_id, path) for image_id, path in wanted.items() if image_id not in have]
    first = next_free_block(store_path)
    blocks = tuple(
        (first + n, tuple(missing[start : start + shard_images]))
        for n, start in enumerate(range(0, len(missing), shard_images))
    )
    rows = (first + len(blocks)) * shard_images
    writer = uuid.uuid4().hex
    write_atomic(writer_file(store_path), writer)
    return ExtractionPlan(store_path, blocks, rows, shard_images, reused=len(wanted) - len(missing), writer=writer)


def writer_file(store_path: Path) -> Path:
    """Names the run whose planned blocks may write into the store (next to its lock file)."""
    return store_path.with_suffix(".writer")


# Blocks per Dask task at most: within a task the next block decodes while the model runs on
# the current one (`load_blocks`); smaller tasks report progress and balance workers more often.
MAX_RUN_BLOCKS = 8


def run_extraction_tasks(
    client: Client,
    plans: dict[str, ExtractionPlan],
    backbone: BackboneSpec,
    geometry: TokenGeometry,
    device: str,
    callbacks: dict[str, Progress | None],
) -> dict[str, tuple[int, dict[str, str]]]:
    """Submit every planned block; returns product -> (images extracted, failed id -> reason).

    A product's first block creates or grows its store (array metadata has one writer), so
    it is a task of its own and the product's other blocks are submitted once it is done, in
    runs of consecutive blocks (`extraction_runs`); products start side by side.
    """
    resources = gpu_resources(client)
    workers = sum(
        1 for w in client.scheduler_info()["workers"].values() if resources is None or w.get("resources", {}).get("GPU")
    )

    def submit(product: str, blocks: tuple[tuple[int, tuple[tuple[str, str], ...]], ...], grow: bool) -> Future:
        plan = plans[product]
        # A product's first block holds back its other blocks, so it goes first; then the longest runs.
        priority = MAX_RUN_BLOCKS + 1 if grow else len(blocks)
        return client.submit(
            extract_blocks_task,
            str(plan.store_path),
            blocks,
            backbone,
            geometry.grid,
            device,
            plan.shard_images,
            plan.rows if grow else 0,
            plan.writer,
            pure=False,
            resources=resources,
            priority=priority,
        )

    owner: dict[Future, tuple[str, slice, bool]] = {}  # future -> (product, its blocks in the plan, sizes the store)
    pending = as_completed()
    results: dict[str, tuple[int, dict[str, str]]] = {product: (0, {}) for product in plans}
    done_images = dict.fromkeys(plans, 0)
    totals = {product: sum(len(batch) for _, batch in plan.blocks) for product, plan in plans.items()}

    def start(product: str, positions: slice, grow: bool) -> None:
        future = submit(product, plans[product].blocks[positions], grow=grow)
        owner[future] = (product, positions, grow)
        pending.add(future)

    for product, plan in plans.items():
        if callbacks[product]:
            callbacks[product](0, totals[product])
        if plan.blocks:
            start(product, slice(0, 1), grow=True)
    for future in pending:
        product, positions, grew = owner.pop(future)
        extracted, failed = future.result()  # a worker's error surfaces here, with its traceback
        plan = plans[product]
        results[product] = (results[product][0] + extracted, {**results[product][1], **failed})
        done_images[product] += sum(len(batch) for _, batch in plan.blocks[positions])
        failpoint("extract-block")
        after = positions.stop
        if grew and after < len(plan.blocks):
            if extracted:  # the store is sized: the other blocks write side by side
                for run in extraction_runs(after, len(plan.blocks), workers):
                    start(product, run, grow=False)
            else:  # nothing readable in that block, so nothing was written: the next one sizes the store
                start(product, slice(after, after + 1), grow=True)
        if callbacks[product]:
            callbacks[product](done_images[product], totals[product])
    return results


def extraction_runs(first: int, stop: int, workers: int) -> list[slice]:
    """Blocks first..stop-1 in runs of consecutive blocks, one Dask task each, shrinking to single blocks.

    Each run takes a ``1 / (2 * workers)`` share of the blocks left (1 to `MAX_RUN_BLOCKS`), so
    a product's runs shrink towards its end. Submitted longest first (`run_extraction_tasks`),
    the night ends on single blocks: a worker that finishes early waits at most one block for
    the others, where equal runs left one worker idle for a whole run (1.7 s of a 13.7 s stage,
    ViT-B on 90 images; docs/performance.md).
    """
    runs = []
    start = first
    while start < stop:
        size = max(1, min(MAX_RUN_BLOCKS, (stop - start) // (2 * max(1, workers))))
        runs.append(slice(start, start + size))
        start += size
    return runs


def gpu_resources(client: Client) -> dict[str, int] | None:
    """``{"GPU": 1}`` when some worker declares a GPU resource (extraction then runs only there), else None."""
    workers = client.scheduler_info()["workers"].values()
    return {"GPU": 1} if any(w.get("resources", {}).get("GPU") for w in workers) else None


@functools.lru_cache(maxsize=1)
def worker_backbone(spec: BackboneSpec, device: str) -> Backbone:
    """The backbone of this worker process, loaded at its first block and kept (one model per worker)."""
    return load_backbone(spec, device=device)


def extract_blocks_task(
    store_path: str,
    blocks: Sequence[tuple[int, Sequence[tuple[str, str]]]],
    spec: BackboneSpec,
    grid: tuple[int, int],
    device: str,
    shard_images: int,
    grow_to: int,
    writer: str,
) -> tuple[int, dict[str, str]]:
    """Dask task: tokens of a run of (block index, images), each block into its own shard and record.

    The next block decodes in threads while the model runs on the current one. ``grow_to`` > 0
    (a product's first block) creates or grows the store to that many rows at the first block
    written. A task of a run that died (its client gone, the task already running) finds
    another run's token in the writer file and writes nothing more: that run may have planned
    the same block index for other images. Returns (images extracted, failed id -> reason).
    """

    def still_ours() -> bool:
        return writer_file(Path(store_path)).read_text() == writer

    if not still_ours():
        return 0, {}
    backbone = worker_backbone(spec, device)
    if backbone.grid != tuple(grid):
        raise ValueError(f"{spec.name} cuts a {backbone.grid} grid, the run resolved {tuple(grid)}")
    extracted, failed, rows = 0, {}, grow_to
    loaded = load_blocks([batch for _, batch in blocks], backbone.preprocess, pin_memory=backbone.device.type == "cuda")
    with torch.inference_mode(), contextlib.closing(loaded):
        for (block, _), pixels in zip(blocks, loaded):
            if not extract_block(Path(store_path), block, pixels, backbone, shard_images, rows, may_write=still_ours):
                return 0, {}
            extracted += len(pixels.image_ids)
            failed.update(pixels.failed)
            rows = rows if not pixels.image_ids else 0  # sized once something is written
    return extracted, failed


def extract_block(
    store_path: Path,
    block: int,
    pixels: PixelBlock,
    backbone: Backbone,
    shard_images: int,
    rows: int,
    *,
    may_write: Callable[[], bool] = lambda: True,
) -> bool:
    """Extract one decoded block of images, then write its shard and record.

    ``rows`` > 0 creates or grows the store to that many rows first (one writer at a time);
    ``may_write`` is asked once more just before writing. Returns False when it said no and
    nothing was written.
    """
    if pixels.pixels is None:
        return True
    layer_tokens, embeddings = backbone.extract(pixels.pixels)
    if not may_write():
        return False
    layout = TokenLayout(
        layers=backbone.spec.layers,
        grid=backbone.grid,
        channels=layer_tokens[0].shape[-1],
        embed_dim=embeddings.shape[-1],
        shard_images=shard_images,
    )
    if rows:
        group = prepare_token_store(store_path, layout, rows)
    else:
        group = open_token_store(store_path, layout)
    failpoint("worker-extract")
    tokens = [t.cpu().numpy() for t in layer_tokens]
    write_token_block(group, store_path, block, list(pixels.image_ids), tokens, embeddings.cpu().numpy())
    return True


@dataclass(frozen=True)
class ExtractResult:
    extracted: int
    reused: int
    failed: dict[str, str]  # image id -> reason, for files that broke after cataloguing


def extract_tokens_to_store(
    store_path: Path,
    images: Sequence[tuple[str, str]],
    load_backbone: Callable[[], Backbone],
    *,
    shard_images: int = 8,
    on_progress: Progress | None = None,
    decode_threads: int | None = None,
) -> ExtractResult:
    """Make sure the store holds tokens for every (image id, path); extract only the missing.

    The backbone is loaded only when something is missing. Each block of images is one
    shard per array and gets its record only after its data, so a crash loses at most the
    block in flight. One writer at a time per store (a lock file), so runs for other days
    that share the store wait instead of interleaving. The next block decodes in
    ``decode_threads`` threads (default: `loading.decode_threads`; 0: one image after the other, in
    this thread) while the model runs on the current one; the tokens are the same either way.
    """
    wanted = dict(images)  # duplicates of one content share one row
    waiting = f"another run is writing tokens to {store_path}; waiting for it"
    with exclusive_lock(store_path.with_suffix(".lock"), waiting_message=waiting):
        drop_damaged_blocks(store_path, list(wanted))
        have = token_index(store_path)
        missing = [(image_id, path) for image_id, path in wanted.items() if image_id not in have]
        if on_progress:
            on_progress(0, len(missing))
        if not missing:
            return ExtractResult(extracted=0, reused=len(wanted), failed={})
        backbone = load_backbone()
        failed: dict[str, str] = {}
        first = next_free_block(store_path)
        batches = [missing[start : start + shard_images] for start in range(0, len(missing), shard_images)]
        rows = (first + len(batches)) * shard_images
        loaded = load_blocks(
            batches, backbone.preprocess, threads=decode_threads, pin_memory=backbone.device.type == "cuda"
        )
        with contextlib.closing(loaded):
            for n, pixels in enumerate(loaded):
                # the first written block sizes the store; later ones write into it
                extract_block(store_path, first + n, pixels, backbone, shard_images, rows)
                failed.update(pixels.failed)
                if pixels.image_ids:
                    failpoint("extract-block")
                if on_progress:
                    on_progress(min((n + 1) * shard_images, len(missing)), len(missing))
    return ExtractResult(extracted=len(missing) - len(failed), reused=len(wanted) - len(missing), failed=failed)
