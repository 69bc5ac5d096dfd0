"""What is in INPUT: one record per image-like file, readable or not, grouped by product.

Layout: each immediate subdirectory of INPUT is a product (its own scoring pool) and holds
its images at any depth; image files lying directly in INPUT form one more product named
after INPUT's own folder. Every file whose suffix looks like an image is catalogued, broken
or not, so the nightly report can say what was skipped and why.

Decisions a caller must know
----------------------------
* ``image_id`` is the sha256 of the file's bytes; a file whose bytes cannot be read gets
  ``"path:" + sha256(path bytes)`` instead, so ids stay unique and visibly not content.
* Files with the same bytes within one product are all listed; every one after the first
  (in sorted order) has ``duplicate_of`` set and is scored once, through the first.
* Symlinks are never followed out of INPUT: symlinked directories are not entered, and a
  symlinked image whose target lies outside INPUT is catalogued as failed.
* Names that are not valid UTF-8 are kept as ``os.fsdecode`` strings (lone surrogates);
  ``open()`` accepts them, and JSON dumps of an entry show the raw bytes backslash-escaped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_serializer

from .atomic import write_atomic
from .identity import params_key
from .imageio import DEFAULT_MAX_PIXELS, ImageReadError, content_hash, read_rgb
from .layout import catalog_path
from .manifests import CatalogRef, ImageRecord, ProductRef

__all__ = ["IMAGE_SUFFIXES", "CatalogEntry", "Catalog", "catalog_files", "catalog_manifest", "scan_input"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class CatalogEntry(BaseModel):
    """One image-like file found in INPUT."""

    model_config = ConfigDict(frozen=True)

    # sha256 hex of the bytes, or "path:<sha256 of the path>" when the bytes are unreadable.
    image_id: str
    # Absolute POSIX path (INPUT made absolute, symlinks not resolved) + relpath.
    path: str
    # Relative to INPUT, POSIX separators; unique within a catalog.
    relpath: str
    product: str
    # Upright size as read_rgb returns it (EXIF orientation applied); None when failed.
    width: int | None = None
    height: int | None = None
    status: Literal["ok", "failed"]
    reason: str | None = None
    notes: tuple[str, ...] = ()
    # Path of the first file of the same product with the same bytes; None for originals.
    duplicate_of: str | None = None

    def record(self) -> ImageRecord:
        """The entry as publishing reads it: the same fields, ``relpath`` within its product folder."""
        return ImageRecord(
            **self.model_dump(exclude={"product", "relpath"}), relpath=_within_product(self.relpath, self.product)
        )

    @field_serializer("path", "relpath", "duplicate_of", when_used="json")
    def _printable_path(self, value: str | None) -> str | None:
        # JSON needs valid UTF-8; undecodable name bytes are shown as \xNN instead of crashing.
        if value is None:
            return None
        return os.fsencode(value).decode("utf-8", "backslashreplace")


class Catalog(BaseModel):
    """Everything ``scan_input`` found, in (product, relpath) order."""

    model_config = ConfigDict(frozen=True)

    input_dir: str
    entries: tuple[CatalogEntry, ...]
    # Product folders holding no image-like file at all.
    empty_products: tuple[str, ...] = ()
    # Folders below INPUT that could not be listed (relpaths); their files are missing above.
    unreadable_dirs: tuple[str, ...] = ()

    @property
    def products(self) -> tuple[str, ...]:
        """Sorted names of the products with at least one entry (ok or failed)."""
        return tuple(sorted({entry.product for entry in self.entries}))

    @property
    def n_images(self) -> int:
        """Number of entries, failed and duplicates included."""
        return len(self.entries)

    @property
    def n_failed(self) -> int:
        """Number of entries with status "failed"."""
        return sum(entry.status == "failed" for entry in self.entries)

    def ok_entries(self, product: str) -> tuple[CatalogEntry, ...]:
        """The entries of ``product`` to score: readable and not duplicates, in catalog order."""
        return tuple(
            entry
            for entry in self.entries
            if entry.product == product and entry.status == "ok" and entry.duplicate_of is None
        )


def scan_input(
    input_dir: str | os.PathLike,
    *,
    min_side: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int | None = None,
) -> Catalog:
    """Catalogue every image-like file under INPUT, decoding each distinct file once.

    Parameters
    ----------
    input_dir : str or path-like
        INPUT: product subfolders and/or image files directly inside.
    min_side, max_pixels : int
        Passed to ``read_rgb``; a file breaking either is catalogued as failed.
    threads : int, optional
        Files hashed and decoded side by side (default: the cores, at most 8); the catalogue
        is the same for any count.

    Returns
    -------
    catalog : Catalog
        Entries sorted by (product, relpath); empty product folders listed separately.

    Raises
    ------
    FileNotFoundError
        When ``input_dir`` does not exist.
    NotADirectoryError
        When ``input_dir`` is not a directory.
    """
    if not isinstance(min_side, int) or min_side < 1:
        raise ValueError(f"min_side must be a positive int, got {min_side!r}")
    if not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    root = Path(os.path.abspath(os.fsdecode(input_dir)))
    if not root.exists():
        raise FileNotFoundError(f"input_dir {os.fsdecode(input_dir)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"input_dir {os.fsdecode(input_dir)!r} is not a directory")
    real_root = os.path.realpath(root)

    found: list[tuple[str, str]] = []  # (product, relpath)
    empty_products: list[str] = []
    unreadable_dirs: list[str] = []
    for item in sorted(os.scandir(root), key=lambda item: item.name):
        if item.is_dir(follow_symlinks=False):
            relpaths, unreadable = _image_relpaths(root, Path(item.path))
            unreadable_dirs.extend(unreadable)
            if relpaths:
                found.extend((item.name, relpath) for relpath in relpaths)
            elif not unreadable:
                empty_products.append(item.name)
        elif item.is_symlink() and item.is_dir():
            log.warning("%s: symlinked product folder not followed", item.path)
        elif _has_image_suffix(item.name):
            found.append((root.name, item.name))

    entries = _catalog_entries(root, real_root, found, min_side=min_side, max_pixels=max_pixels, threads=threads)
    catalog = Catalog(
        input_dir=str(root),
        entries=tuple(entries),
        empty_products=tuple(empty_products),
        unreadable_dirs=tuple(sorted(unreadable_dirs)),
    )
    for product in catalog.empty_products:
        log.warning("%s: product folder holds no images", root / product)
    for relpath in catalog.unreadable_dirs:
        log.error("%s: folder cannot be listed; its images are not catalogued", root / relpath)
    log.info(
        "%s: %d files in %d products, %d failed, %d duplicates, %d empty product folders",
        root,
        catalog.n_images,
        len(catalog.products),
        catalog.n_failed,
        sum(entry.duplicate_of is not None for entry in entries),
        len(catalog.empty_products),
    )
    return catalog


def catalog_manifest(
    catalog: Catalog,
    out_dir: str | os.PathLike,
    run_date: str,
    *,
    pools: dict[str, tuple[tuple[str, ...], ...]] | None = None,
    logger: logging.Logger = log,
) -> CatalogRef:
    """Write the day's catalog records under OUT and return the manifest the stages pass on.

    A product with fewer than 2 readable images gets its ``not_scored_reason``; ``pools``
    (product -> fixed pools of image ids) pins evaluation's split instead of ``pool_size``.
    """
    records: dict[str, list[dict]] = {}
    for entry in catalog.entries:
        records.setdefault(entry.product, []).append(entry.record().model_dump())
    products = [
        ProductRef(
            name=name,
            images=tuple(sorted({e.image_id: e.path for e in catalog.ok_entries(name)}.items())),
            n_files=len(records[name]),
            pools=(pools or {}).get(name),
        )
        for name in catalog.products
    ]
    products = [_with_size_check(product, logger) for product in products]
    for name in catalog.empty_products:
        logger.warning("product folder %r holds no image files", name)
    body = json.dumps(records, sort_keys=True)
    path = catalog_path(out_dir, run_date, params_key(records, length=32))
    write_atomic(path, body)
    logger.info("%d files in %d products, %d unreadable", len(catalog.entries), len(products), catalog.n_failed)
    return CatalogRef(
        input_dir=catalog.input_dir,
        run_date=run_date,
        catalog_path=str(path),
        products=tuple(products),
        empty_products=tuple(catalog.empty_products),
        n_files=len(catalog.entries),
        n_failed=catalog.n_failed,
    )


def read_records(catalog: CatalogRef) -> dict[str, list[ImageRecord]]:
    """The catalog records `catalog_manifest` wrote, product by product."""
    raw = json.loads(Path(catalog.catalog_path).read_text())
    return {product: [ImageRecord(**record) for record in records] for product, records in raw.items()}


def _with_size_check(product: ProductRef, logger: logging.Logger) -> ProductRef:
    if len(product.images) < 2:
        reason = (
            f"product {product.name!r} has {len(product.images)} readable image(s); MuSc scores an image "
            "against the other images of its product, so it needs at least 2"
        )
        logger.warning(reason)
        return product.model_copy(update={"not_scored_reason": reason})
    if len(product.images) < 5:
        logger.warning(
            "product %r has only %d images: each image is compared with its nearest other image only",
            product.name,
            len(product.images),
        )
    return product


def _within_product(relpath: str, product: str) -> str:
    """The catalog's path relative to INPUT, made relative to the product folder."""
    prefix = product + "/"
    return relpath[len(prefix) :] if relpath.startswith(prefix) else relpath


def catalog_files(
    root: str | os.PathLike,
    files: list[tuple[str, str]],
    *,
    min_side: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int | None = None,
) -> Catalog:
    """Catalogue an explicit list of files (a benchmark's test set) the way `scan_input` does.

    Parameters
    ----------
    root : str or path-like
        Folder the relative paths start from.
    files : list of (product, relpath)
        relpath is a POSIX path relative to ``root``.
    """
    root = Path(os.path.abspath(os.fsdecode(root)))
    if not root.is_dir():
        raise NotADirectoryError(f"root {root} is not a directory")
    entries = _catalog_entries(
        root, os.path.realpath(root), files, min_side=min_side, max_pixels=max_pixels, threads=threads
    )
    return Catalog(input_dir=str(root), entries=tuple(entries))


def _catalog_entries(
    root: Path, real_root: str, found: list[tuple[str, str]], *, min_side: int, max_pixels: int, threads: int | None
) -> list[CatalogEntry]:
    """One entry per file in (product, relpath) order: hashed, then each distinct file decoded once.

    Both steps run on ``threads`` threads (None: `default_threads`). Reading and decoding release
    the GIL, and a night of 2448x2048 JPEGs decodes at about 40 ms a file on one core. The
    entries do not depend on the thread count.
    """
    found = sorted(found)
    with ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="catalog") as pool:
        hashed = list(pool.map(lambda item: _hash_file(root, real_root, item[1]), found))
        firsts: dict[tuple[str, str], int] = {}  # (product, image_id) -> index of its first file
        for index, ((product, _), (image_id, _)) in enumerate(zip(found, hashed)):
            if image_id is not None:
                firsts.setdefault((product, image_id), index)
        decoded = dict(
            zip(
                firsts.values(),
                pool.map(lambda i: _decode_file(str(root / found[i][1]), min_side, max_pixels), firsts.values()),
            )
        )
    entries: list[CatalogEntry] = []
    for index, ((product, relpath), (image_id, failure)) in enumerate(zip(found, hashed)):
        path = str(root / relpath)
        record = {"path": path, "relpath": relpath, "product": product}
        if image_id is None:
            entry = CatalogEntry(image_id=_path_id(path), status="failed", reason=failure, **record)
        elif (first := firsts[(product, image_id)]) != index:
            # Same bytes decode the same way: the first file's entry (id, size, outcome) at this path.
            entry = entries[first].model_copy(update={**record, "duplicate_of": entries[first].path})
        else:
            entry = CatalogEntry(image_id=image_id, **decoded[index], **record)
        if entry.status == "failed":
            log.warning("%s: %s", entry.path, entry.reason)
        entries.append(entry)
    return entries


def default_threads() -> int:
    """The catalogue's threads: one per core, at most 8 (decoding a 5-MP capture holds about 15 MB)."""
    return max(1, min(8, os.cpu_count() or 1))


def _has_image_suffix(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _image_relpaths(root: Path, product_dir: Path) -> tuple[list[str], list[str]]:
    """Image-like files below product_dir and the folders that could not be listed.

    Both as POSIX paths relative to root.
    """
    relpaths: list[str] = []
    unreadable: list[str] = []

    def _as_rel(path: str) -> str:
        return str(PurePosixPath(*Path(path).relative_to(root).parts))

    def _note_unreadable(exc: OSError) -> None:
        # Recorded, not raised: one locked folder must not stop the night's run, and it
        # must not pass for an empty one either.
        unreadable.append(_as_rel(exc.filename))

    # followlinks=False: a symlinked folder could lead out of INPUT or loop.
    for dir_path, _, file_names in os.walk(product_dir, followlinks=False, onerror=_note_unreadable):
        relpaths.extend(_as_rel(os.path.join(dir_path, name)) for name in file_names if _has_image_suffix(name))
    return relpaths, unreadable


def _hash_file(root: Path, real_root: str, relpath: str) -> tuple[str | None, str | None]:
    """(content hash, None), or (None, why the file cannot be catalogued)."""
    real_path = os.path.realpath(root / relpath)
    if os.path.commonpath([real_root, real_path]) != real_root:
        return None, "symlink points outside the input folder"
    try:
        return content_hash(root / relpath), None
    except ImageReadError as exc:
        return None, exc.reason


def _decode_file(path: str, min_side: int, max_pixels: int) -> dict:
    """A distinct file's outcome: its upright size and notes, or why it failed to decode."""
    try:
        image, notes = read_rgb(path, max_pixels=max_pixels, min_side=min_side)
    except ImageReadError as exc:
        return {"status": "failed", "reason": exc.reason}
    with image:
        return {"width": image.width, "height": image.height, "status": "ok", "notes": tuple(notes)}


def _path_id(path: str) -> str:
    return "path:" + hashlib.sha256(os.fsencode(path)).hexdigest()
