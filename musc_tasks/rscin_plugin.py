"""RsCIN as a plug-in: re-score another method's image scores (the paper's appendix A.2.4).

A site that already runs PatchCore or another detector keeps its per-image scores and adds
RsCIN on top: each image's score is smoothed over the most similar images of its product,
with the image-level tokens of one of our backbones (MUSC_SPEC §6, §8). Every row gets a
status; a missing file or a score that is not a number fails that row only.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch

from .atomic import write_atomic
from .backbone import Backbone, load_backbone
from .catalog import catalog_files
from .config import BackboneSpec, patch_size
from .core import rescore_images
from .extract import extract_tokens_to_store
from .imageio import ImageReadError, read_rgb
from .layout import token_store_path
from .store import read_embeddings, token_index

logger = logging.getLogger(__name__)

__all__ = ["RSCIN_COLUMNS", "read_score_table", "rscin_rescore_scores", "write_score_table"]

# Columns added next to the input's: the re-scored value, what happened, and why not.
RSCIN_COLUMNS = ("rscin_score", "rscin_status", "rscin_reason")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def read_score_table(path: Path) -> pd.DataFrame:
    """A CSV (``.csv``) or Parquet (``.parquet``, ``.pq``) table of per-image scores."""
    path = Path(path)
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        return pd.read_parquet(path)
    if path.suffix.lower() == ".csv":
        # Paths stay text: no NaN for an empty cell, no number parsing of a file named 001.
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    raise ValueError(f"{path}: scores must be a .csv or .parquet file")


def write_score_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write the table as CSV or Parquet (by suffix), atomically."""
    path = Path(path)
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return write_atomic(path, buffer.getvalue())
    if path.suffix.lower() == ".csv":
        return write_atomic(path, frame.to_csv(index=False).encode())
    raise ValueError(f"{path}: the output must be a .csv or .parquet file")


def rscin_rescore_scores(
    scores: pd.DataFrame,
    images_root: str | os.PathLike,
    backbone: BackboneSpec,
    *,
    k_list: Sequence[int] = (1, 2, 3),
    path_column: str = "path",
    score_column: str = "score",
    product_column: str | None = None,
    token_cache: str | os.PathLike | None = None,
    device: str = "auto",
    batch_images: int = 8,
) -> pd.DataFrame:
    """Re-score another method's image scores with RsCIN, per product.

    Parameters
    ----------
    scores : DataFrame with N rows
        One row per image: a path (relative to ``images_root``, or absolute inside it) and a score.
    images_root : path
        Folder of the images: ``ROOT/<product>/**`` as for ``musc score`` (images directly in
        ROOT form one product named after it), unless ``product_column`` names the product.
    backbone : BackboneSpec
        Whose image-level tokens measure similarity (CLIP: unit vectors; DINO: raw tokens).
    k_list : sequence of int
        RsCIN windows (MUSC_SPEC §6); ``1,8,9`` for VisA-like data.
    path_column, score_column, product_column : str
        Column names in ``scores``.
    token_cache : path, optional
        A ``musc score`` results folder: tokens already in its token stores for this backbone
        are reused and missing ones are added there (all layers, so a later ``musc score``
        reuses them too); without it, tokens are computed in memory.
    device : {"auto", "cpu", "cuda"}
    batch_images : int
        Images per forward pass when computing in memory.

    Returns
    -------
    rescored : DataFrame with N rows
        ``scores`` in its order with ``rscin_score`` right after the score column, then
        ``rscin_status`` ("rescored", "failed", "not_rescored") and ``rscin_reason``; plus a
        ``product`` column when the products came from the folders.
    """
    for column in (path_column, score_column, product_column):
        if column is not None and column not in scores.columns:
            raise ValueError(f"no column {column!r} in the scores table; it has {', '.join(map(str, scores.columns))}")
    if product_column is None and "product" in scores.columns:
        raise ValueError("the scores table has a 'product' column: name it as the product column, or rename it")
    if not k_list or any(int(k) < 1 for k in k_list):
        raise ValueError(f"k_list must hold integers >= 1, got {list(k_list)}")
    root = Path(os.path.abspath(os.fspath(images_root)))
    if not root.is_dir():
        raise NotADirectoryError(f"images root {root} is not a directory")

    rows = _locate_rows(scores, root, path_column, score_column, product_column)
    files = _catalogue(rows, root, min_side=patch_size(backbone))
    tokens = _image_tokens(files, backbone, token_cache=token_cache, device=device, batch_images=batch_images)
    rescored = np.full(len(rows), np.nan)
    for product in sorted({row.product for row in rows if row.reason is None}):
        members = [i for i, row in enumerate(rows) if row.reason is None and row.product == product]
        for i in members:
            if isinstance(tokens[rows[i].key], str):  # the file broke after it was catalogued
                rows[i].reason = tokens[rows[i].key]
        members = [i for i in members if rows[i].reason is None]
        if len(members) < 2:
            for i in members:
                rows[i].too_few = True
                rows[i].reason = (
                    f"product {product!r} has {len(members)} usable image; RsCIN compares an image with the "
                    "other images of its product, so it needs at least 2"
                )
            continue
        scores_of = np.array([rows[i].score for i in members])
        rescored[members] = rescore_images(scores_of, np.stack([tokens[rows[i].key] for i in members]), k_list)

    out = scores.copy()
    if product_column is None:
        out["product"] = [row.product for row in rows]
    out.insert(out.columns.get_loc(score_column) + 1, "rscin_score", rescored)
    out["rscin_status"] = [row.status for row in rows]
    out["rscin_reason"] = [row.reason for row in rows]
    return out


@dataclass
class _Row:
    """One input row on its way through: where its file is, and why it was not re-scored."""

    score: float
    product: str | None = None
    relpath: str | None = None
    key: tuple[str, str] | None = None  # (product, image id) once catalogued
    reason: str | None = None
    # The file is fine but its product has too few usable images for RsCIN.
    too_few: bool = False

    @property
    def status(self) -> str:
        if self.reason is None:
            return "rescored"
        return "not_rescored" if self.too_few else "failed"


def _locate_rows(
    scores: pd.DataFrame, root: Path, path_column: str, score_column: str, product_column: str | None
) -> list[_Row]:
    """Each row's score, product and path relative to ROOT, or the reason it has none."""
    values = pd.to_numeric(scores[score_column], errors="coerce").to_numpy(dtype=np.float64)
    products = scores[product_column].astype(str).tolist() if product_column else [None] * len(scores)
    rows = []
    for value, raw_score, raw_path, product in zip(values, scores[score_column], scores[path_column], products):
        row = _Row(score=float(value))
        if not np.isfinite(value):
            row.reason = f"score {raw_score!r} is not a number"
        where = _relative_path(raw_path, root)
        if where.startswith("!"):
            row.reason = row.reason or where[1:]
        else:
            parts = PurePosixPath(where).parts
            row.relpath = where
            row.product = product if product is not None else (parts[0] if len(parts) > 1 else root.name)
        rows.append(row)
    return rows


def _catalogue(rows: list[_Row], root: Path, *, min_side: int) -> dict[tuple[str, str], str]:
    """Hash and check every usable row's file as a nightly run does; (product, image id) -> path."""
    wanted = sorted({(row.product, row.relpath) for row in rows if row.reason is None})
    entries = {(e.product, e.relpath): e for e in catalog_files(root, wanted, min_side=min_side).entries}
    files = {}
    for row in rows:
        if row.reason is None:
            entry = entries[(row.product, row.relpath)]
            if entry.status != "ok":
                row.reason = f"{entry.path}: {entry.reason}"
            else:
                row.key = (row.product, entry.image_id)
                files[row.key] = entry.path
    return files


def _relative_path(raw, root: Path) -> str:
    """The POSIX path of a table's file relative to ROOT, or ``"!reason"`` when it has none."""
    if raw is None or (isinstance(raw, float) and np.isnan(raw)) or str(raw).strip() == "":
        return "!no path"
    path = Path(os.path.abspath(root / os.fspath(raw)))  # an absolute raw path replaces root
    try:
        return str(PurePosixPath(*path.relative_to(root).parts))
    except ValueError:
        return f"!{path} is not inside the images root {root}"


def _image_tokens(
    images: dict[tuple[str, str], str],
    spec: BackboneSpec,
    *,
    token_cache: str | os.PathLike | None,
    device: str,
    batch_images: int,
) -> dict[tuple[str, str], np.ndarray | str]:
    """(product, image id) -> image-level token (D,), or the reason it could not be had."""
    loaded: list[Backbone] = []

    def backbone() -> Backbone:
        if not loaded:
            loaded.append(load_backbone(spec, device=device))
        return loaded[0]

    by_product: dict[str, list[tuple[str, str]]] = {}
    for (product, image_id), path in sorted(images.items()):
        by_product.setdefault(product, []).append((image_id, path))
    found: dict[tuple[str, str], np.ndarray | str] = {}
    for product, members in by_product.items():
        if token_cache is not None:
            store = token_store_path(token_cache, spec.key, product)
            result = extract_tokens_to_store(store, members, backbone)
            index = token_index(store)
            kept = [image_id for image_id, _ in members if image_id in index]
            tokens = read_embeddings(store, [index[i] for i in kept]) if kept else []
            found.update({(product, i): t for i, t in zip(kept, tokens)})
            found.update({(product, i): reason for i, reason in result.failed.items()})
            logger.info("%s: %d image tokens extracted, %d reused", product, result.extracted, result.reused)
            continue
        for first in range(0, len(members), batch_images):
            pixels, ids = [], []
            for image_id, path in members[first : first + batch_images]:
                try:
                    image, _ = read_rgb(path)
                except ImageReadError as error:
                    found[(product, image_id)] = str(error)
                    continue
                pixels.append(backbone().preprocess(image))
                ids.append(image_id)
            if ids:
                _, tokens = backbone().extract(torch.stack(pixels))
                found.update({(product, i): t for i, t in zip(ids, tokens.numpy())})
    return found
