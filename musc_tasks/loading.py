"""Blocks of image files as batches of pixels, decoded ahead in threads while the model runs.

Decoding and squashing a 5-megapixel capture costs a CPU far more than the forward pass of a
small ViT, and on a GPU the card waits for the CPU. `load_blocks` decodes the images of the
next block(s) in a thread pool (PIL releases the GIL while it decodes and resamples) while the
caller runs the model on the current one; the blocks still come out whole and in order, so
each forward pass sees exactly the batch it saw before and the tokens stay byte-identical.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .imageio import ImageReadError, read_rgb

__all__ = ["PixelBlock", "decode_threads", "load_blocks"]

logger = logging.getLogger(__name__)

Preprocess = Callable[[Image.Image], Tensor]


@dataclass(frozen=True)
class PixelBlock:
    """One block of images, preprocessed.

    Attributes
    ----------
    pixels : (B, 3, S, S) float32 tensor, or None when no image of the block could be read
        In the block's order, failed images left out; in pinned memory when asked for.
    image_ids : tuple of B str
        The images of ``pixels``, in its order.
    failed : dict of str to str
        Image id -> reason, for the files that could not be decoded.
    """

    pixels: Tensor | None
    image_ids: tuple[str, ...]
    failed: dict[str, str] = field(default_factory=dict)


def decode_threads() -> int:
    """Default decoding threads: the cores this process may use, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def load_blocks(
    batches: Iterable[Sequence[tuple[str, str]]],
    preprocess: Preprocess,
    *,
    threads: int | None = None,
    ahead: int = 1,
    pin_memory: bool = False,
) -> Iterator[PixelBlock]:
    """Each batch of (image id, path) as a `PixelBlock`, decoded up to ``ahead`` blocks in advance.

    Parameters
    ----------
    batches : iterable of sequences of (str, str)
        The blocks, each a sequence of (image id, file path).
    preprocess : callable
        PIL RGB image -> (3, S, S) float32 tensor (the backbone's `preprocess`).
    threads : int, optional
        Decoding threads (default `decode_threads`). 0 decodes in the caller's thread, one
        image after the other, when the block is asked for: the plain path.
    ahead : int
        Blocks decoded beyond the one the caller holds: memory stays within ``ahead + 1``
        blocks of preprocessed pixels plus one full-size image per thread.
    pin_memory : bool
        Stack each block into page-locked memory, so that a copy to a CUDA device with
        ``non_blocking=True`` overlaps with the work already queued on the card.

    Yields
    ------
    block : PixelBlock
        One per batch, in order. A file that cannot be decoded is logged and named in
        ``failed``; any other error is raised when its block is reached.
    """
    threads = decode_threads() if threads is None else threads
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if ahead < 0:
        raise ValueError(f"ahead must be >= 0, got {ahead}")
    if threads == 0:
        for batch in batches:
            yield _assemble(batch, [_decode_one(path, preprocess) for _, path in batch], pin_memory)
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="musc-decode")
    in_flight: deque[tuple[Sequence[tuple[str, str]], list[Future]]] = deque()
    pending = iter(batches)
    try:
        while True:
            while len(in_flight) <= ahead:
                batch = next(pending, None)
                if batch is None:
                    break
                in_flight.append((batch, [pool.submit(_decode_one, path, preprocess) for _, path in batch]))
            if not in_flight:
                return
            batch, futures = in_flight.popleft()
            yield _assemble(batch, [future.result() for future in futures], pin_memory)
    finally:
        # The caller may stop early (its run lost the store): drop what was not started.
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_one(path: str, preprocess: Preprocess) -> Tensor | ImageReadError:
    """The preprocessed pixels of one file, or why it could not be read (returned, not raised)."""
    try:
        image, _ = read_rgb(Path(path))
    except ImageReadError as error:
        return error
    return preprocess(image)


def _assemble(batch: Sequence[tuple[str, str]], decoded: list[Tensor | ImageReadError], pin_memory: bool) -> PixelBlock:
    pixels, ids, failed = [], [], {}
    for (image_id, _), result in zip(batch, decoded):
        if isinstance(result, ImageReadError):
            failed[image_id] = result.reason
            logger.warning("%s", result)
            continue
        pixels.append(result)
        ids.append(image_id)
    if not pixels:
        return PixelBlock(None, (), failed)
    # stacked straight into page-locked memory when asked: one copy, not two
    pinned = (
        torch.empty((len(pixels), *pixels[0].shape), dtype=pixels[0].dtype, pin_memory=True) if pin_memory else None
    )
    return PixelBlock(torch.stack(pixels, out=pinned), tuple(ids), failed)  # (B, 3, S, S)
