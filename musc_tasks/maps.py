"""Raw anomaly maps of a published day: find one image's map and upsample it to the capture's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .core import upsample_maps
from .layout import maps_store_path
from .store import read_maps_store

__all__ = ["MapNotFound", "read_map", "upsample_map"]


class MapNotFound(LookupError):
    """No maps store, or no image in it, matches the request; the message says what exists."""


def upsample_map(patch_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A patch-grid map upsampled as the masks were made: (height, width) float32 array.

    Parameters
    ----------
    patch_map : (h, w) float16 or float32 array
        One image's map from a maps store.
    size : (height, width)
        The capture's size in pixels (as a viewer shows it).
    """
    grid = patch_map.shape
    patch = torch.from_numpy(np.asarray(patch_map, dtype=np.float32).reshape(1, -1))
    return upsample_maps(patch, grid, size)[0].numpy()


def _store(out_dir: Path, run_date: str, product: str, backbone_key: str | None) -> Path:
    folder = maps_store_path(out_dir, run_date, product, "x").parent
    stores = sorted(folder.glob("*.zarr")) if folder.is_dir() else []
    if backbone_key is not None:
        stores = [s for s in stores if s.stem == backbone_key or backbone_key in s.stem]
    if len(stores) != 1:
        found = ", ".join(s.stem for s in sorted(folder.glob("*.zarr"))) if folder.is_dir() else "none"
        wanted = f" matching backbone {backbone_key!r}" if backbone_key else ""
        raise MapNotFound(f"{folder}: need exactly one maps store{wanted}; found: {found or 'none'}")
    return stores[0]


def read_map(
    out_dir: str | Path,
    run_date: str,
    product: str,
    image: str,
    *,
    backbone_key: str | None = None,
    upsample: bool = True,
) -> tuple[np.ndarray, dict]:
    """One image's anomaly map of a published day.

    Parameters
    ----------
    out_dir : str or Path
        The results folder (OUT).
    run_date, product : str
        The day (YYYY-MM-DD) and product.
    image : str
        The image's path as in the scores table, its path relative to the product folder, its
        file name (when unique) or its ``image_id``.
    backbone_key : str, optional
        The backbone key or a unique part of it; needed only when the day has several.
    upsample : bool
        True: the map at the capture's size, exactly the pixel scores its mask and regions were
        made from (``score > mask_level`` of its scores row); False: the stored (h, w) patch-grid map.

    Returns
    -------
    score_map : (height, width) or (h, w) float32 array
    info : dict
        ``path``, ``image_id``, ``pixel_threshold``, ``heatmap_min``, ``heatmap_max``, ``store``.
    """
    store = _store(Path(out_dir), run_date, product, backbone_key)
    maps, attrs = read_maps_store(store)
    entries = attrs["images"]
    matches = [e for e in entries if image in (e["path"], e["relpath"], e["image_id"])]
    if not matches:
        matches = [e for e in entries if Path(e["relpath"]).name == image]
    if len({e["path"] for e in matches}) != 1:
        reason = "several images match" if matches else "no image matches"
        raise MapNotFound(f"{store}: {reason} {image!r} ({len(entries)} images; give a path from the scores table)")
    entry = matches[0]
    patch_map = maps[entry["row"]].astype(np.float32)
    info = {key: attrs[key] for key in ("pixel_threshold", "heatmap_min", "heatmap_max")}
    info.update(path=entry["path"], image_id=entry["image_id"], store=str(store))
    if not upsample:
        return patch_map, info
    return upsample_map(patch_map, (entry["height"], entry["width"])), info
