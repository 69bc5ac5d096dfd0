"""Stage 1: per-layer ViT tokens of every image, streamed block by block into Zarr."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import Backbone
from .faults import failpoint
from .imageio import ImageReadError, read_rgb
from .layout import token_store_path
from .locks import exclusive_lock
from .manifests import CatalogRef, TokenGeometry, TokensRef
from .store import (
    TokenLayout,
    drop_damaged_blocks,
    next_free_block,
    prepare_token_store,
    token_index,
    write_token_block,
)

logger = logging.getLogger(__name__)

__all__ = ["ExtractResult", "extract_catalog", "extract_tokens_to_store"]

Progress = Callable[[int, int], None]
# product -> a context manager yielding that product's progress callback
ProductProgress = Callable[[str], AbstractContextManager[Progress | None]]


def _no_progress(product: str) -> AbstractContextManager[None]:
    return nullcontext()


def extract_catalog(
    catalog: CatalogRef,
    backbone_key: str,
    geometry: TokenGeometry,
    out_dir: str | Path,
    load_backbone: Callable[[], Backbone],
    *,
    progress: ProductProgress = _no_progress,
    log: logging.Logger = logger,
) -> tuple[TokensRef, ...]:
    """Stage 1: tokens of every readable image not already in the backbone's token stores.

    ``load_backbone`` is called at most once, and only when some image lacks tokens.
    """
    loaded: list[Backbone] = []

    def load_once() -> Backbone:
        if not loaded:
            backbone = load_backbone()
            if backbone.grid != geometry.grid:
                raise ValueError(f"{backbone.spec.name} cuts a {backbone.grid} grid, the run resolved {geometry.grid}")
            loaded.append(backbone)
        return loaded[0]

    refs = []
    for product in catalog.products:
        if product.not_scored_reason:
            continue
        store = token_store_path(out_dir, backbone_key, product.name)
        with progress(product.name) as on_progress:
            result = extract_tokens_to_store(store, product.images, load_once, on_progress=on_progress)
        index = token_index(store)
        kept = tuple(i for i, _ in product.images if i in index)
        log.info("%s: %d extracted, %d from cache", product.name, result.extracted, result.reused)
        refs.append(
            TokensRef(
                product=product.name,
                store_path=str(store),
                geometry=geometry,
                image_ids=kept,
                token_rows=tuple(index[i] for i in kept),
                extracted=result.extracted,
                reused=result.reused,
                failed=tuple(sorted(result.failed.items())),
                pools=product.pools,
            )
        )
    return tuple(refs)


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
    block_images: int = 8,
    on_progress: Progress | None = None,
) -> ExtractResult:
    """Make sure the store holds tokens for every (image id, path); extract only the missing.

    The backbone is loaded only when something is missing. Each block of images is one
    shard per array and gets its record only after its data, so a crash loses at most the
    block in flight. One writer at a time per store (a lock file), so runs for other days
    that share the store wait instead of interleaving.
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
        block = next_free_block(store_path)
        n_blocks = -(-len(missing) // block_images)
        group = None
        failed: dict[str, str] = {}
        done = 0
        for first in range(0, len(missing), block_images):
            batch = missing[first : first + block_images]
            pixels, ids = [], []
            for image_id, path in batch:
                try:
                    image, _ = read_rgb(Path(path))
                except ImageReadError as error:
                    failed[image_id] = error.reason
                    logger.warning("%s", error)
                    continue
                pixels.append(backbone.preprocess(image))
                ids.append(image_id)
            if ids:
                layer_tokens, embeddings = backbone.extract(torch.stack(pixels))
                if group is None:
                    layout = TokenLayout(
                        layers=backbone.spec.layers,
                        grid=backbone.grid,
                        channels=layer_tokens[0].shape[-1],
                        embed_dim=embeddings.shape[-1],
                        block_images=block_images,
                    )
                    group = prepare_token_store(store_path, layout, (block + n_blocks) * block_images)
                write_token_block(group, store_path, block, ids, [t.numpy() for t in layer_tokens], embeddings.numpy())
                block += 1
                failpoint("extract-block")
            done += len(batch)
            if on_progress:
                on_progress(done, len(missing))
    return ExtractResult(extracted=len(missing) - len(failed), reused=len(wanted) - len(missing), failed=failed)
