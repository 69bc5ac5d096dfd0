"""Known-good reference sets per (product, backbone): what they hold, where from, which version.

A set is filled by a person (`add_references`: a folder of images they vouch for) or by the
pipeline's own history (`curate_references`: images that scored clearly normal on past nights,
`choose_references` the rule). A reference set is a small JSON file beside the token stores,
``OUT/cache/references/<backbone_key>/<product>/<name>.json``; its images' tokens live in the
product's token store (extracted once, shared with the nights that contain the same bytes).
Every change (add, remove) writes a new version: the version number goes up and the content
key (a hash of the sorted image ids) says exactly which images it holds, so a score row that
records both can be reproduced. Each entry keeps its provenance: image id, source path,
when and by what it was added, and the night and score it came from when curated.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from . import tables
from .atomic import write_atomic
from .backbone import load_backbone
from .catalog import IMAGE_SUFFIXES, catalog_files
from .config import BackboneSpec, patch_size
from .extract import extract_tokens_to_store
from .identity import params_key, path_segment
from .layout import reference_set_path, reference_sets_dir, token_store_path
from .locks import exclusive_lock
from .store import read_token_rows, token_index

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_REFERENCES",
    "MIN_CURATED",
    "ReferenceEntry",
    "ReferenceSet",
    "add_references",
    "choose_references",
    "curate_references",
    "describe",
    "list_reference_sets",
    "read_reference_set",
    "reference_set_name",
    "reference_tokens",
    "remove_references",
    "resolve_reference_sets",
]

# A reference GEMM costs M images per night image; 64 known-good images already cover a
# product's normal variation (the paper's many-shot tables stop gaining at 32).
DEFAULT_MAX_REFERENCES = 64
# Curation refuses to write fewer: the combined mode's leave-one-out scale needs 2 references.
MIN_CURATED = 2


class ReferenceEntry(BaseModel):
    """One known-good image and where it came from."""

    model_config = ConfigDict(frozen=True)

    image_id: str
    source_path: str
    added_at: str  # ISO time, UTC
    added_by: str  # "user:<name>" for a golden set, "curate" for the pipeline's own pick
    from_date: str | None = None  # the night it was scored on, when curated
    from_score: float | None = None  # its image score that night, when curated


class ReferenceSet(BaseModel):
    """One version of a product's reference set for one backbone."""

    model_config = ConfigDict(frozen=True)

    name: str
    product: str
    backbone_key: str
    version: int
    content_key: str  # hash of the sorted image ids
    entries: tuple[ReferenceEntry, ...]
    token_store: str

    @property
    def label(self) -> str:
        """What a score row records: name, version and content key."""
        return f"{self.name}@v{self.version}:{self.content_key}"


def _content_key(entries: Sequence[ReferenceEntry]) -> str:
    return params_key(sorted(e.image_id for e in entries), length=12)


def read_reference_set(out_dir: str | Path, backbone_key: str, product: str, name: str) -> ReferenceSet:
    """The current version of a stored set, or a clear error naming what exists."""
    path = reference_set_path(out_dir, backbone_key, product, name)
    if not path.is_file():
        known = [s.name for s in list_reference_sets(out_dir, backbone_key=backbone_key, product=product)]
        raise FileNotFoundError(
            f"no reference set {name!r} for product {product!r} and backbone {backbone_key} under {out_dir}"
            + (f" (it has: {', '.join(known)})" if known else " (it has none: add one with 'musc references add')")
        )
    return ReferenceSet.model_validate_json(path.read_text())


def list_reference_sets(
    out_dir: str | Path, *, backbone_key: str | None = None, product: str | None = None
) -> list[ReferenceSet]:
    """Every stored set under OUT, optionally of one backbone and product, sorted."""
    root = reference_sets_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob("*/*/*.json")):
        stored = ReferenceSet.model_validate_json(path.read_text())
        if backbone_key not in (None, stored.backbone_key) or product not in (None, stored.product):
            continue
        found.append(stored)
    return found


def _image_files(folder: Path) -> list[str]:
    """Image files below ``folder``, as sorted POSIX paths relative to it."""
    if not folder.is_dir():
        raise NotADirectoryError(f"reference folder {folder} is not a directory")
    found = []
    for here, _, names in os.walk(folder):
        for file_name in names:
            if file_name.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(here, file_name).relative_to(folder).as_posix())
    return sorted(found)


def _write(out_dir: str | Path, stored: ReferenceSet) -> Path:
    path = reference_set_path(out_dir, stored.backbone_key, stored.product, stored.name)
    return write_atomic(path, stored.model_dump_json(indent=1).encode())


def add_references(
    out_dir: str | Path,
    product: str,
    folders: Sequence[str | Path],
    backbone: BackboneSpec,
    *,
    name: str = "golden",
    added_by: str | None = None,
    max_size: int = DEFAULT_MAX_REFERENCES,
    device: str = "auto",
    loader: Callable[[], object] | None = None,
) -> tuple[ReferenceSet, list[str]]:
    """Add a person's known-good images to a product's set and extract their tokens once.

    Parameters
    ----------
    out_dir : path
        The results folder (its token store for this product and backbone is used).
    product : str
    folders : sequence of paths
        Folders of known-good images of ``product`` (searched recursively), or image files.
    backbone : BackboneSpec
    name : str
        The set's name (one product may keep several).
    added_by : str, optional
        Provenance; default ``user:<login>``.
    max_size : int
        The most images a set may hold; adding beyond it is refused.
    device : str
    loader : callable, optional
        Builds the backbone when tokens are missing (tests pass a tiny one); default `load_backbone`.

    Returns
    -------
    stored : ReferenceSet
        The new version.
    problems : list of str
        One line per file that was not added, with the reason.
    """
    if not folders:
        raise ValueError("no reference folder given")
    if path_segment(name) != name or not name:
        raise ValueError(f"reference set name {name!r} must be made of letters, digits, '.', '_' or '-'")
    who = added_by or f"user:{os.environ.get('USER', 'unknown')}"
    now = datetime.now(UTC).isoformat(timespec="seconds")
    store = token_store_path(out_dir, backbone.key, product)
    problems: list[str] = []
    new: dict[str, ReferenceEntry] = {}
    for given in map(Path, folders):
        given = given.resolve()
        folder, files = (given.parent, [given.name]) if given.is_file() else (given, _image_files(given))
        if not files:
            raise ValueError(f"reference folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        catalog = catalog_files(folder, [(product, rel) for rel in files], min_side=patch_size(backbone))
        for entry in catalog.entries:
            if entry.status != "ok":
                problems.append(f"{entry.path}: {entry.reason}")
            elif entry.duplicate_of is None and entry.image_id not in new:
                new[entry.image_id] = ReferenceEntry(
                    image_id=entry.image_id, source_path=entry.path, added_at=now, added_by=who
                )
    path = reference_set_path(out_dir, backbone.key, product, name)
    with exclusive_lock(path.with_suffix(".lock")):
        previous = read_reference_set(out_dir, backbone.key, product, name) if path.is_file() else None
        kept = {e.image_id: e for e in previous.entries} if previous else {}
        added = {i: e for i, e in new.items() if i not in kept}
        if len(kept) + len(added) > max_size:
            raise ValueError(
                f"reference set {name!r} of {product!r} would hold {len(kept) + len(added)} images, over its cap of "
                f"{max_size}: remove some first or pass a larger --max"
            )
        if previous and not added:
            return previous, problems  # nothing new: the same version
        build = loader or partial(load_backbone, backbone, device=device)
        result = extract_tokens_to_store(store, [(e.image_id, e.source_path) for e in added.values()], build)
        for image_id, reason in result.failed.items():
            problems.append(f"{added.pop(image_id).source_path}: {reason}")
        entries = tuple(kept.values()) + tuple(added.values())
        if not entries:
            raise ValueError(f"no usable reference image for {product!r}: " + "; ".join(problems))
        stored = ReferenceSet(
            name=name,
            product=product,
            backbone_key=backbone.key,
            version=(previous.version + 1) if previous else 1,
            content_key=_content_key(entries),
            entries=entries,
            token_store=str(store),
        )
        _write(out_dir, stored)
    logger.info("%s: %d added, %d already in the set", stored.label, len(added), len(new) - len(added))
    return stored, problems


def choose_references(rows: pd.DataFrame, max_size: int = DEFAULT_MAX_REFERENCES) -> pd.DataFrame:
    """The curation rule: which images of a product's past nights become references.

    An image (by content hash) qualifies when, on every night it was scored, it ranked in the
    bottom half of its night (``rank > n / 2``, rank 1 the most anomalous) and was not flagged.
    Each qualifying image is credited to its most normal night (largest ``rank / n``, then the
    earliest), nights are visited by date in turn, each giving its lowest-scoring image not
    yet taken, until ``max_size``: one night, however large, cannot fill the set.

    Parameters
    ----------
    rows : DataFrame
        Score rows of one product and backbone with columns date, image_id, path, score, rank,
        flagged and status; rows whose status is not ``scored`` are ignored.
    max_size : int
        The most images to pick.

    Returns
    -------
    picked : DataFrame
        Columns image_id, path, date, score, in picking order.
    """
    scored = rows[(rows["status"] == "scored") & rows["score"].notna() & rows["rank"].notna()].copy()
    scored["n"] = scored.groupby("date")["image_id"].transform("size")
    scored["normal_rank"] = scored["rank"] / scored["n"]  # 1 = the night's most normal image
    scored["clear"] = (scored["rank"] > scored["n"] / 2) & ~scored["flagged"].fillna(False).astype(bool)
    always = scored.groupby("image_id")["clear"].transform("all")
    candidates = scored[always].sort_values(["normal_rank", "date", "path"], ascending=[False, True, True])
    credited = candidates.drop_duplicates("image_id")  # each image once, on its most normal night
    queues = [
        night.sort_values(["score", "image_id"])[["image_id", "path", "date", "score"]].to_dict("records")
        for _, night in sorted(credited.groupby("date"), key=lambda item: item[0])
    ]
    picked: list[dict] = []
    while queues and len(picked) < max_size:
        for queue in queues:
            if queue and len(picked) < max_size:
                picked.append(queue.pop(0))
        queues = [queue for queue in queues if queue]
    return pd.DataFrame(picked, columns=["image_id", "path", "date", "score"])


def _check_day(text: str, what: str) -> str:
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise ValueError(f"{what} must be a date YYYY-MM-DD, got {text!r}") from None


def _iso_dates(frame: pd.DataFrame) -> pd.DataFrame:
    """The ``date`` column as YYYY-MM-DD strings: what provenance records and messages show."""
    return frame.assign(date=pd.to_datetime(frame["date"]).dt.strftime("%Y-%m-%d"))


def curate_references(
    out_dir: str | Path,
    product: str,
    backbone_key: str,
    date_from: str,
    date_to: str,
    *,
    name: str = "curated",
    max_size: int = DEFAULT_MAX_REFERENCES,
) -> tuple[ReferenceSet, pd.DataFrame]:
    """Pick references from the pipeline's own history (`choose_references`) into a set.

    Nights between ``date_from`` and ``date_to`` (inclusive) scored with ``backbone_key`` are
    read from ``tables/scores``; nights that ``tables/days`` marks as suspected of a systematic
    defect are left out (their ranks are what a repeated defect distorts); images whose tokens
    are no longer in the token store are skipped (no re-extraction). The set's earlier curated
    entries are replaced by the new pick, entries a person added are kept, and the cap counts both.

    Returns
    -------
    stored : ReferenceSet
        The new version (the same one when the pick did not change).
    picked : DataFrame
        The curated images (`choose_references`).
    """
    if path_segment(name) != name or not name:
        raise ValueError(f"reference set name {name!r} must be made of letters, digits, '.', '_' or '-'")
    first, last = _check_day(date_from, "--from"), _check_day(date_to, "--to")
    if first > last:
        raise ValueError(f"--from {first} is after --to {last}")
    out = Path(out_dir)
    scores = _iso_dates(tables.read_table(out / "tables" / "scores", filters=[("product", "=", product)]))
    scores = scores[scores["backbone_key"] == backbone_key]
    in_range = scores[(scores["date"] >= first) & (scores["date"] <= last)]
    if in_range.empty:
        nights = sorted(scores["date"].unique())
        raise ValueError(
            f"no night of {product!r} scored with backbone {backbone_key} between {first} and {last} under {out}"
            + (f" (it has {nights[0]} to {nights[-1]})" if nights else " (it has none)")
        )
    days = _iso_dates(tables.read_table(out / "tables" / "days", filters=[("product", "=", product)]))
    suspected = set(days[(days["backbone_key"] == backbone_key) & days["systematic_defect_suspected"]]["date"])
    store = token_store_path(out, backbone_key, product)
    with_tokens = set(token_index(store)) if store.is_dir() else set()
    usable = in_range[~in_range["date"].isin(suspected) & in_range["image_id"].isin(with_tokens)]
    path = reference_set_path(out, backbone_key, product, name)
    with exclusive_lock(path.with_suffix(".lock")):
        previous = read_reference_set(out, backbone_key, product, name) if path.is_file() else None
        kept = tuple(e for e in previous.entries if e.added_by != "curate") if previous else ()
        if max_size - len(kept) < MIN_CURATED:
            raise ValueError(
                f"reference set {name!r} of {product!r} holds {len(kept)} images a person added, which leaves "
                f"no room for {MIN_CURATED} curated ones under its cap of {max_size}: pass a larger --max or "
                "curate into another --name"
            )
        picked = choose_references(usable, max_size - len(kept))
        if len(picked) < MIN_CURATED:
            raise ValueError(
                f"only {len(picked)} image(s) of {product!r} qualify as references between {first} and {last} "
                f"({in_range['date'].nunique()} night(s), {len(suspected & set(in_range['date']))} left out as "
                f"suspected, {in_range['image_id'].nunique()} distinct images); at least {MIN_CURATED} are needed "
                "(README: the curation rule)"
            )
        now = datetime.now(UTC).isoformat(timespec="seconds")
        entries = kept + tuple(
            ReferenceEntry(
                image_id=row.image_id,
                source_path=row.path,
                added_at=now,
                added_by="curate",
                from_date=row.date,
                from_score=float(row.score),
            )
            for row in picked.itertuples()
        )

        def provenance(found: Sequence[ReferenceEntry]) -> list[tuple]:
            return [(e.image_id, e.added_by, e.from_date, e.from_score) for e in found]

        if previous and provenance(previous.entries) == provenance(entries):
            return previous, picked
        stored = ReferenceSet(
            name=name,
            product=product,
            backbone_key=backbone_key,
            version=(previous.version + 1) if previous else 1,
            content_key=_content_key(entries),
            entries=entries,
            token_store=str(store),
        )
        _write(out, stored)
    logger.info("%s: curated %d images from %d night(s)", stored.label, len(picked), picked["date"].nunique())
    return stored, picked


def remove_references(
    out_dir: str | Path, product: str, backbone_key: str, *, name: str = "golden", image_ids: Sequence[str] = ()
) -> ReferenceSet | None:
    """Remove some images (ids or unique id prefixes) from a set, or the whole set when none are named.

    Returns the new version, or None when the set was removed. Tokens stay in the token store
    (nights may share them).
    """
    path = reference_set_path(out_dir, backbone_key, product, name)
    with exclusive_lock(path.with_suffix(".lock")):
        current = read_reference_set(out_dir, backbone_key, product, name)
        if not image_ids:
            path.unlink()
            return None
        drop = set()
        for wanted in image_ids:
            matches = [e.image_id for e in current.entries if e.image_id.startswith(wanted)]
            if len(matches) != 1:
                raise ValueError(
                    f"{wanted!r} matches {len(matches)} images of reference set {current.label}; "
                    "give a unique id prefix"
                )
            drop.add(matches[0])
        entries = tuple(e for e in current.entries if e.image_id not in drop)
        if not entries:
            raise ValueError(f"removing these would empty reference set {current.label}; remove the whole set instead")
        stored = current.model_copy(
            update={"version": current.version + 1, "entries": entries, "content_key": _content_key(entries)}
        )
        _write(out_dir, stored)
    return stored


def reference_set_name(references: str) -> str:
    """The stored set that ``references`` means: that name, or ``dir-<hash of DIR>`` for a folder."""
    folder = Path(references)
    return "dir-" + params_key(str(folder.resolve()), length=8) if folder.is_dir() else references


def resolve_reference_sets(
    references: str,
    products: Sequence[str],
    out_dir: str | Path,
    backbone: BackboneSpec,
    *,
    device: str = "auto",
) -> dict[str, ReferenceSet]:
    """The reference set of each product: a stored set's name, or a folder laid out like INPUT.

    A folder ``DIR/<product>/**`` becomes a stored set named ``dir-<hash of DIR>`` (tokens
    extracted once, versioned like any set). Products without references are left out; none
    at all is an error.
    """
    folder = Path(references)
    sets = {}
    if folder.is_dir():
        name = reference_set_name(references)
        for product in products:
            if (folder / product).is_dir():
                stored, problems = add_references(
                    out_dir,
                    product,
                    [folder / product],
                    backbone,
                    name=name,
                    added_by=f"folder:{folder.resolve()}",
                    device=device,
                )
                for line in problems:
                    logger.warning("reference not used: %s", line)
                sets[product] = stored
    else:
        for product in products:
            if reference_set_path(out_dir, backbone.key, product, references).is_file():
                sets[product] = read_reference_set(out_dir, backbone.key, product, references)
    if not sets:
        what = f"folder {folder} has no <product>/ subfolder" if folder.is_dir() else f"no reference set {references!r}"
        raise FileNotFoundError(
            f"{what} for any of the products {', '.join(products)} with backbone {backbone.key} "
            "(see 'musc references list')"
        )
    return sets


def reference_tokens(stored: ReferenceSet) -> list[np.ndarray]:
    """The set's tokens from its token store: one (M, L, C) float32 array per layer."""
    index = token_index(Path(stored.token_store))
    missing = [e.source_path for e in stored.entries if e.image_id not in index]
    if missing:
        raise FileNotFoundError(
            f"reference set {stored.label}: tokens of {len(missing)} image(s) are missing from {stored.token_store} "
            f"(e.g. {missing[0]}); add them again with 'musc references add'"
        )
    return read_token_rows(Path(stored.token_store), [index[e.image_id] for e in stored.entries])


def describe(stored: ReferenceSet) -> str:
    """One line per set for ``musc references list``."""
    sources = ", ".join(sorted({e.added_by for e in stored.entries}))
    return f"{stored.product}\t{stored.label}\t{len(stored.entries)} images\t{stored.backbone_key}\tadded by {sources}"
