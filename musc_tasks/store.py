"""Zarr stores for tokens and pool scores: the only module that touches Zarr.

Token store, one per (backbone, product), shared by every day:
    OUT/cache/tokens/<backbone_key>/<product>.zarr
      layer_NN   (rows, L, C) float16, one chunk per image, one shard per `shard_images` images
      embeddings (rows, D) float32
      blocks/NNNNNN.json   written after a shard's data: which image ids its rows hold
Pool store, one per (backbone, scoring parameters, set of images in a pool):
    OUT/cache/pools/<backbone_key>/<product>/<pool_key>.zarr
      aggregates/NNNNNN.npy  (R*Y, B, L, C) float32 scratch, not Zarr: task block N's LNAMD tokens,
                         mapped by the pair tasks that read them; dropped once every block pair is done
      similarity   (R*Y, N, L, N) float32 scratch, one chunk per ordered pair of task blocks
      patch_scores (N, L) float32, one chunk per task block (`task_images` images)
      done/aggregates-A, done/pair-A-B, done/row-A   markers written after the data they vouch for
      attrs["complete"] set last; the scratch arrays are deleted after it.
Maps store, one per (date, product, backbone), written whole by the publish stage:
    OUT/maps/<date>/<product>/<backbone_key>.zarr
      maps (N, h, w) float16 anomaly maps at patch-grid resolution, one chunk per image
      attrs: image_ids, rows (relative path -> row), sizes (original height, width per row),
             pixel_threshold, heatmap_min, heatmap_max
A shard or chunk is only ever written by one task, so concurrent Dask workers never
touch the same file; a block without its record is simply redone.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import zarr

from .atomic import disk_space_for, write_atomic
from .config import CODE_VERSION
from .identity import array_digest

logger = logging.getLogger(__name__)

__all__ = [
    "read_maps_store",
    "write_maps_store",
    "TokenLayout",
    "PoolLayout",
    "create_pool_store",
    "mark_done",
    "is_done",
    "open_pool_store",
    "write_block_aggregates",
    "open_block_aggregates",
    "BlockAggregates",
    "drop_aggregates",
    "write_pool_array",
    "read_rows",
    "read_token_rows",
    "read_embeddings",
    "token_index",
    "open_token_store",
    "token_store_layout",
    "write_token_block",
    "prepare_token_store",
]


@dataclass(frozen=True)
class TokenLayout:
    layers: tuple[int, ...]
    grid: tuple[int, int]
    channels: int
    embed_dim: int
    shard_images: int  # images per Zarr shard of every array; one extraction block writes one shard


@dataclass(frozen=True)
class PoolLayout:
    image_ids: tuple[str, ...]
    grid: tuple[int, int]
    n_maps: int  # R * Y score maps, one per (aggregation degree, layer)
    task_images: int  # images per task block: one Dask task per pair of blocks, one per block row

    @property
    def n_blocks(self) -> int:
        """Task blocks of the pool."""
        return -(-len(self.image_ids) // self.task_images)

    def block_rows(self, block: int) -> slice:
        """The pool rows of task block ``block``."""
        return slice(block * self.task_images, min((block + 1) * self.task_images, len(self.image_ids)))


# Layout attributes that older versions stored under another name ("block" named all three sizes).
_OLD_ATTRIBUTE_NAMES = {"shard_images": "block_images", "task_images": "block_images"}


def _layout_attributes(layout: TokenLayout | PoolLayout) -> dict:
    """A layout as the store's JSON attributes."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(layout).items()}


def _read_layout(path: Path, layout_type: type[TokenLayout] | type[PoolLayout]):
    """The layout a store was created with, whichever version of the attribute names wrote it."""
    attrs = zarr.open_group(path, mode="r").attrs
    values = {}
    for field in fields(layout_type):
        name = field.name if field.name in attrs else _OLD_ATTRIBUTE_NAMES.get(field.name, field.name)
        values[field.name] = tuple(attrs[name]) if isinstance(attrs[name], list) else attrs[name]
    return layout_type(**values)


def _layer_name(layer: int) -> str:
    return f"layer_{layer:02d}"


# -- token store ------------------------------------------------------------------------


def prepare_token_store(path: Path, layout: TokenLayout, rows: int) -> zarr.Group:
    """Open the token store for writing, creating it or growing it to hold ``rows`` rows."""
    if not path.exists():
        group = zarr.open_group(
            path,
            mode="w-",
            attributes={**_layout_attributes(layout), "code_version": CODE_VERSION},
        )
        length = layout.grid[0] * layout.grid[1]
        for layer in layout.layers:
            group.create_array(
                _layer_name(layer),
                shape=(0, length, layout.channels),
                dtype="float16",
                chunks=(1, length, layout.channels),
                shards=(layout.shard_images, length, layout.channels),
                dimension_names=("image", "patch", "channel"),
                fill_value=0,
            )
        group.create_array(
            "embeddings",
            shape=(0, layout.embed_dim),
            dtype="float32",
            chunks=(layout.shard_images, layout.embed_dim),
            dimension_names=("image", "feature"),
            fill_value=0,
        )
    group = zarr.open_group(path, mode="r+")
    if token_store_layout(path) != layout:
        raise ValueError(f"token store {path} was written with another layout than {layout}")
    # The arrays by name: listing the group's members also finds the `blocks` records folder,
    # which Zarr warns is not part of the hierarchy (a ZarrUserWarning on every grown store).
    for name in (*map(_layer_name, layout.layers), "embeddings"):
        array = group[name]
        if array.shape[0] < rows:
            array.resize((rows, *array.shape[1:]))
    return group


def open_token_store(path: Path, layout: TokenLayout) -> zarr.Group:
    """Open a token store that `prepare_token_store` already sized, to write blocks into it."""
    if token_store_layout(path) != layout:
        raise ValueError(f"token store {path} was written with another layout than {layout}")
    return zarr.open_group(path, mode="r+")


def token_store_layout(path: Path) -> TokenLayout:
    """The layout a token store was created with."""
    return _read_layout(path, TokenLayout)


def token_index(path: Path) -> dict[str, int]:
    """Row of every image whose tokens are complete in the store (from the block records)."""
    records = path / "blocks"
    index: dict[str, int] = {}
    if not records.is_dir():
        return index
    for record in sorted(records.glob("*.json")):
        block = json.loads(record.read_text())
        for offset, image_id in enumerate(block["image_ids"]):
            index.setdefault(image_id, block["start"] + offset)
    return index


def next_free_block(path: Path) -> int:
    records = sorted((path / "blocks").glob("*.json")) if (path / "blocks").is_dir() else []
    return int(records[-1].stem) + 1 if records else 0


def write_token_block(
    group: zarr.Group,
    path: Path,
    block: int,
    image_ids: Sequence[str],
    layer_tokens: Sequence[np.ndarray],
    embeddings: np.ndarray,
) -> None:
    """Write shard ``block`` of the store (one shard per array), then its record."""
    layout = token_store_layout(path)
    if len(image_ids) > layout.shard_images:
        raise ValueError(f"a shard holds at most {layout.shard_images} images, got {len(image_ids)}")
    start = block * layout.shard_images
    arrays = {_layer_name(layer): tokens.astype(np.float16) for layer, tokens in zip(layout.layers, layer_tokens)}
    arrays["embeddings"] = embeddings.astype(np.float32)
    for name, values in arrays.items():
        # A block index is reused after a crash or damage: remove what is there first, or
        # zarr would merge into (and first decode) a half-written or damaged shard.
        shutil.rmtree(path / name / "c" / str(block), ignore_errors=True)
        with disk_space_for(path / name, values.nbytes):
            group[name][start : start + len(values)] = values
    record = {"start": start, "image_ids": list(image_ids), "sha256": {k: array_digest(v) for k, v in arrays.items()}}
    write_atomic(path / "blocks" / f"{block:06d}.json", json.dumps(record))


def drop_damaged_blocks(path: Path, image_ids: Sequence[str]) -> list[str]:
    """Check the blocks holding ``image_ids`` against their checksums; forget damaged ones.

    A block whose data no longer matches its record, or cannot be decoded, loses its
    record, so its images count as missing and are extracted again into a new block.

    Returns
    -------
    dropped : list of str
        Record file names that were removed.
    """
    records = path / "blocks"
    if not records.is_dir():
        return []
    wanted = set(image_ids)
    group = zarr.open_group(path, mode="r")
    dropped = []
    for record_path in sorted(records.glob("*.json")):
        try:
            record = json.loads(record_path.read_text())
            if not wanted.intersection(record["image_ids"]):
                continue
            rows = slice(record["start"], record["start"] + len(record["image_ids"]))
            intact = all(array_digest(group[name][rows]) == digest for name, digest in record["sha256"].items())
        except Exception as error:  # any decode failure of a damaged chunk means: not intact
            logger.warning("%s: unreadable (%s)", record_path, error)
            intact = False
        if not intact:
            logger.warning("%s: tokens do not match their checksums; they will be extracted again", record_path)
            record_path.unlink()
            dropped.append(record_path.name)
    return dropped


def read_token_rows(path: Path, rows: Sequence[int]) -> list[np.ndarray]:
    """Tokens of the given rows, one (len(rows), L, C) float32 array per layer."""
    group = zarr.open_group(path, mode="r")
    layout = token_store_layout(path)
    return [read_rows(group[_layer_name(layer)], rows).astype(np.float32) for layer in layout.layers]


def read_embeddings(path: Path, rows: Sequence[int]) -> np.ndarray:
    """Image embeddings of the given rows: (len(rows), D) float32 array."""
    group = zarr.open_group(path, mode="r")
    return read_rows(group["embeddings"], rows)


def read_rows(array: zarr.Array, rows: Sequence[int]) -> np.ndarray:
    """``array``'s rows ``rows`` (any order, repeats allowed), read as slices of consecutive rows.

    The same values as ``array.get_orthogonal_selection((rows, ...))``, which decodes a
    row's whole shard again for every row it selects: 8 rows of one shard of ViT-B tokens
    took 70 ms that way and 5 ms as one slice (docs/performance.md).

    Parameters
    ----------
    array : zarr array, shape (R, ...)
    rows : sequence of int
        Row indices in ``[0, R)``.

    Returns
    -------
    values : (len(rows), ...) array of ``array``'s dtype

    Raises
    ------
    IndexError
        For a row outside ``[0, R)`` (a slice would silently stop at the end).
    """
    wanted = np.asarray(rows, dtype=np.int64).reshape(-1)
    if wanted.size == 0:
        return np.empty((0, *array.shape[1:]), dtype=array.dtype)
    distinct = np.unique(wanted)
    if distinct[0] < 0 or distinct[-1] >= array.shape[0]:
        raise IndexError(f"rows {distinct[0]}..{distinct[-1]} out of range for {array.shape[0]} rows")
    runs = np.split(distinct, np.flatnonzero(np.diff(distinct) != 1) + 1)
    values = np.concatenate([array[int(run[0]) : int(run[-1]) + 1] for run in runs])
    if np.array_equal(wanted, distinct):  # already in order: no second copy
        return values
    return values[np.searchsorted(distinct, wanted)]


# -- pool store -------------------------------------------------------------------------


def create_pool_store(path: Path, layout: PoolLayout, attributes: dict) -> zarr.Group:
    """Create the pool store, or open it if a previous run created it with the same layout."""
    n = len(layout.image_ids)
    length = layout.grid[0] * layout.grid[1]
    block = layout.task_images
    if path.exists():
        if pool_layout(path) != layout:
            raise ValueError(f"pool store {path} holds another pool or task block size")
        if (path / _AGGREGATED_BEFORE).exists():
            drop_aggregates(path)  # an older version's Zarr aggregates: its blocks are aggregated again
        return zarr.open_group(path, mode="r+")
    group = zarr.open_group(
        path,
        mode="w-",
        attributes={**attributes, **_layout_attributes(layout), "code_version": CODE_VERSION, "complete": False},
    )
    # Scratch, written once and read back soon: compressing near-random floats saves little and costs CPU.
    group.create_array(
        "similarity",
        shape=(layout.n_maps, n, length, n),
        dtype="float32",
        chunks=(layout.n_maps, block, length, block),
        dimension_names=("map", "image", "patch", "other_image"),
        fill_value=np.nan,
        compressors=None,
    )
    group.create_array(
        "patch_scores",
        shape=(n, length),
        dtype="float32",
        chunks=(block, length),
        dimension_names=("image", "patch"),
        fill_value=np.nan,
    )
    return group


_AGGREGATED = "aggregates"
_AGGREGATED_BEFORE = "aggregated"  # a Zarr group of Zarr arrays, before the aggregates were mapped files


def write_block_aggregates(path: Path, block: int, maps: Iterable[np.ndarray], n_maps: int) -> None:
    """Store task block ``block``'s LNAMD tokens, its (B, L, C) float32 maps in one .npy file, then its marker.

    Each map is written as it comes, so the caller holds one map at a time. The file is written
    with plain writes (a full disk is an `OSError`, where writing into a mapped file would be a
    SIGBUS). The marker ``done/aggregates-<block>`` is written last; a block without it is
    aggregated again.
    """
    maps = iter(maps)
    first = next(maps, None)
    if first is None:
        raise ValueError(f"{path}: block {block} needs {n_maps} aggregated maps")
    target = _aggregates_path(path, block)
    target.parent.mkdir(exist_ok=True)
    header = {"descr": "<f4", "fortran_order": False, "shape": (n_maps, *first.shape)}
    written = 0
    with disk_space_for(target, n_maps * first.size * 4), open(target, "wb") as file:
        np.lib.format.write_array_header_1_0(file, header)
        for values in itertools.chain([first], maps):
            if values.shape != first.shape or written == n_maps:
                raise ValueError(f"{path}: block {block} needs {n_maps} aggregated maps of shape {first.shape}")
            file.write(np.ascontiguousarray(values, dtype="<f4").data)
            written += 1
    if written != n_maps:
        raise ValueError(f"{path}: block {block} needs {n_maps} aggregated maps, got {written}")
    mark_done(path, f"aggregates-{block}")


class BlockAggregates(Sequence):
    """A block's stored LNAMD tokens (`write_block_aggregates`): M maps of (B, L, C) float32, each mapped when indexed.

    The file is mapped, not read: a pair task's GEMM reads the tokens from the page cache the
    writer left them in, where a read would copy every map of both blocks once more per pair
    (a fifth of a ViT-B pair task's time). Each map is its own copy-on-write mapping (a writable
    array that never writes the file), released with the array, so a task that uses one map at
    a time holds one map's pages, as a worker's memory monitor counts them, not the whole file's.
    """

    def __init__(self, file: Path) -> None:
        with open(file, "rb") as stream:
            np.lib.format.read_magic(stream)
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
            self._offset = stream.tell()
        self.file, self.shape, self.dtype = file, shape, dtype
        self._map_bytes = int(np.prod(shape[1:])) * dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(index)
        offset = self._offset + index * self._map_bytes
        return np.memmap(self.file, self.dtype, "c", offset=offset, shape=self.shape[1:])


def open_block_aggregates(path: Path, block: int) -> BlockAggregates:
    """Task block ``block``'s stored LNAMD tokens, (R*Y, B, L, C) float32, one map at a time."""
    if not is_done(path, f"aggregates-{block}"):
        raise RuntimeError(f"{path}: block {block} has no stored aggregates")
    return BlockAggregates(_aggregates_path(path, block))


def _aggregates_path(path: Path, block: int) -> Path:
    return path / _AGGREGATED / f"{block:06d}.npy"


def drop_aggregates(path: Path) -> None:
    """Delete the stored LNAMD tokens once no pair task needs them (markers first, so none is trusted)."""
    for marker in sorted((path / "done").glob("aggregates-*")):
        marker.unlink()
    for folder in (_AGGREGATED, _AGGREGATED_BEFORE):
        shutil.rmtree(path / folder, ignore_errors=True)


def write_pool_array(path: Path, name: str, values: np.ndarray, attributes: dict | None = None) -> None:
    """Store an extra (image, patch) array in a pool-like store (the reference scores of each mode)."""
    group = zarr.open_group(path, mode="r+")
    if name in group:
        del group[name]
    with disk_space_for(path / name, values.nbytes):
        group.create_array(name, data=np.ascontiguousarray(values), dimension_names=("image", "patch"))
    if attributes:
        group.attrs.update(attributes)


def open_pool_store(path: Path, mode: str = "r") -> zarr.Group:
    """The pool store's Zarr group."""
    return zarr.open_group(path, mode=mode)


def pool_layout(path: Path) -> PoolLayout:
    """The layout a pool store (or a pool-like reference store) was created with."""
    return _read_layout(path, PoolLayout)


def mark_done(path: Path, name: str, content: str = "") -> None:
    """Write the marker ``done/<name>`` (after the data it vouches for), with optional content."""
    write_atomic(path / "done" / name, content)


def pool_store_intact(path: Path) -> bool:
    """A complete pool store's patch scores still match the checksums their rows recorded."""
    if not pool_is_complete(path):
        return True
    layout = pool_layout(path)
    try:
        scores = zarr.open_group(path, mode="r")["patch_scores"]
        for block in range(layout.n_blocks):
            if (path / "done" / f"row-{block}").read_text() != array_digest(scores[layout.block_rows(block)]):
                return False
    except Exception as error:  # a chunk that no longer decodes is damage too
        logger.warning("%s: unreadable (%s)", path, error)
        return False
    return True


def is_done(path: Path, name: str) -> bool:
    """Whether the marker ``done/<name>`` exists."""
    return (path / "done" / name).exists()


def finish_pool_store(path: Path) -> None:
    """Set "complete" (last) and drop the scratch arrays (similarity table, aggregated tokens)."""
    group = zarr.open_group(path, mode="r+")
    group.attrs["complete"] = True
    for scratch in (path / "similarity", path / _AGGREGATED):
        if scratch.exists():
            shutil.rmtree(scratch)


def pool_is_complete(path: Path) -> bool:
    return path.exists() and bool(zarr.open_group(path, mode="r").attrs.get("complete", False))


def write_maps_store(path: Path, maps: np.ndarray, attributes: dict) -> Path:
    """Write a maps store whole, replacing any previous one in one rename.

    Parameters
    ----------
    path : Path
        ``OUT/maps/<date>/<product>/<backbone_key>.zarr``.
    maps : (N, h, w) float16 array
        Patch-grid anomaly maps, one per distinct image, in ``attributes["image_ids"]`` order.
    attributes : dict
        JSON-serialisable; written as given, so identical inputs give identical files.
    """
    if maps.ndim != 3 or maps.dtype != np.float16:
        raise ValueError(f"maps must be (N, h, w) float16, got shape {maps.shape} dtype {maps.dtype}")
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with disk_space_for(path, maps.nbytes):
            group = zarr.open_group(staging, mode="w-", attributes={**attributes, "code_version": CODE_VERSION})
            array = group.create_array(
                "maps",
                shape=maps.shape,
                dtype="float16",
                chunks=(1, *maps.shape[1:]),
                dimension_names=("image", "row", "column"),
                fill_value=np.nan,
            )
            if maps.shape[0]:
                array[:] = maps
    except BaseException:
        _remove_until_gone(staging)  # a half-written store must not linger beside the old one
        raise
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    if path.exists():
        path.rename(old)
    staging.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _remove_until_gone(folder: Path, *, attempts: int = 50) -> None:
    """Remove ``folder`` and wait until it stays removed.

    When one chunk write fails, Zarr's other writes of the same call are not cancelled and may
    still land (and recreate the folder) after a first ``rmtree``.
    """
    for _ in range(attempts):
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.1)
        if not folder.exists():
            return


def read_maps_store(path: Path) -> tuple[zarr.Array, dict]:
    """The maps array (N, h, w) float16 of a maps store and its attributes."""
    group = zarr.open_group(path, mode="r")
    return group["maps"], dict(group.attrs)
