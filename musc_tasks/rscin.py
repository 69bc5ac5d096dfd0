"""Stage 3 (rscin): raw image scores, RsCIN over the whole product, and thresholds."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import write_atomic
from .config import CODE_VERSION, RscinParams
from .core import image_scores, rescore_images, upsample_maps
from .faults import failpoint
from .identity import params_key
from .manifests import PoolsRef, ProductScoresRef, TokenGeometry
from .store import open_pool_store, pool_layout, read_embeddings

__all__ = [
    "ImageScore",
    "ProductScores",
    "patch_score_rows",
    "product_scores",
    "read_product_scores",
    "robust_threshold",
    "rscin_products",
    "score_map",
    "threshold_margins",
]

# A normal day's score spread, measured robustly: the median absolute deviation scaled to
# a standard deviation (1.4826 for Gaussian data) is not moved by the few defects of a day.
MAD_TO_SIGMA = 1.4826
AUTO_SIGMAS = 3.0
# When more than half of a day's scores are equal the MAD is 0; the mean absolute deviation
# from the median, scaled by sqrt(pi / 2) (also a standard deviation for Gaussian data), still
# measures the spread of the rest (the usual fallback of the modified z-score).
MEAN_AD_TO_SIGMA = 1.2533


@dataclass(frozen=True)
class ImageScore:
    image_id: str
    pool_index: int
    pool_images: int
    raw_score: float
    score: float


@dataclass(frozen=True)
class ProductScores:
    product: str
    image_threshold: float
    pixel_threshold: float
    map_min: float
    map_max: float
    images: tuple[ImageScore, ...]


def robust_threshold(values: np.ndarray, *, sigmas: float = AUTO_SIGMAS) -> float:
    """``median + sigmas * 1.4826 * MAD``: a label-free outlier threshold.

    Parameters
    ----------
    values : (N,) float array
        One product's scores of one day.

    Returns
    -------
    threshold : float
        Most of a day's parts are good, so the median and MAD describe good parts; a part
        more than ``sigmas`` robust standard deviations above the median is an outlier.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("values is empty: no scores to derive a threshold from")
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    return median + sigmas * MAD_TO_SIGMA * mad


def threshold_margins(scores: np.ndarray, threshold: float) -> np.ndarray:
    """How far each score lies above the threshold, in robust standard deviations of the scores.

    Parameters
    ----------
    scores : (N,) float array
        One product's final scores of one day (each distinct image once).
    threshold : float
        The image threshold the flags were cut at (``auto`` or a fixed number).

    Returns
    -------
    margins : (N,) float64 array
        ``(score - threshold) / sigma`` with ``sigma = 1.4826 * MAD`` of ``scores``; when the
        MAD is 0, ``sigma = 1.2533 * mean(|score - median|)``; NaN for every image when that is
        0 too (all scores equal: no spread to measure against). Positive exactly where
        ``score > threshold`` (a flag), so the sign is the verdict and the size how sure it is;
        with the ``auto`` threshold a margin of 0 is 3 robust standard deviations above the median.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {scores.shape}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    deviations = np.abs(scores - np.median(scores))
    sigma = MAD_TO_SIGMA * float(np.median(deviations))
    if sigma == 0.0:
        sigma = MEAN_AD_TO_SIGMA * float(np.mean(deviations))
    if sigma == 0.0:
        return np.full(scores.shape, np.nan)
    return (scores - threshold) / sigma


def rscin_products(pools: Sequence[PoolsRef], rscin: RscinParams) -> tuple[ProductScoresRef, ...]:
    """Stage 3: the scores of every product, each written next to its pool stores."""
    refs = []
    for ref in pools:
        tokens = ref.tokens
        scores = product_scores(
            ref.product,
            [Path(p) for p in ref.pool_paths],
            Path(tokens.store_path),
            dict(zip(tokens.image_ids, tokens.token_rows)),
            geometry=tokens.geometry,
            rscin=rscin,
        )
        settings = {"rscin_k": list(rscin.k_list), "t": str(rscin.threshold), "p": str(rscin.pixel_threshold)}
        key = params_key({"ids": sorted(ref.pool_paths), "settings": settings, "code": CODE_VERSION}, length=20)
        path = Path(ref.pool_paths[0]).parent / f"scores-{key}.json"
        write_atomic(path, json.dumps(asdict(scores), sort_keys=True))
        failpoint("rscin")
        refs.append(ProductScoresRef(product=ref.product, scores_path=str(path), pools=ref))
    return tuple(refs)


def product_scores(
    product: str,
    pool_paths: Sequence[Path],
    token_path: Path,
    token_rows: dict[str, int],
    *,
    geometry: TokenGeometry,
    rscin: RscinParams,
) -> ProductScores:
    """Raw scores (max of each S x S map), RsCIN across all pools of the product, thresholds.

    The pixel threshold "auto" applies `robust_threshold` to the raw image scores: a pixel is
    anomalous when it scores above what the peak of a typical good image reaches.
    """
    ids, pools, sizes, raw, map_min, map_max = [], [], [], [], np.inf, -np.inf
    side = geometry.image_size
    for index, path in enumerate(pool_paths):
        layout = pool_layout(path)
        patch_scores = torch.from_numpy(open_pool_store(path)["patch_scores"][:])
        map_min = min(map_min, float(patch_scores.min()))
        map_max = max(map_max, float(patch_scores.max()))
        for start in range(0, len(layout.image_ids), 16):  # bounded memory: 16 maps at a time
            maps = upsample_maps(patch_scores[start : start + 16], geometry.grid, (side, side))
            raw.extend(image_scores(maps).tolist())
        ids.extend(layout.image_ids)
        pools.extend([index] * len(layout.image_ids))
        sizes.extend([len(layout.image_ids)] * len(layout.image_ids))
    raw_scores = np.asarray(raw, dtype=np.float64)
    embeddings = read_embeddings(token_path, [token_rows[i] for i in ids])
    final = rescore_images(raw_scores, embeddings, rscin.k_list)
    image_threshold = robust_threshold(final) if rscin.threshold == "auto" else float(rscin.threshold)
    map_threshold = robust_threshold(raw_scores) if rscin.pixel_threshold == "auto" else float(rscin.pixel_threshold)
    images = tuple(
        ImageScore(image_id=i, pool_index=p, pool_images=s, raw_score=float(r), score=float(f))
        for i, p, s, r, f in zip(ids, pools, sizes, raw_scores, final)
    )
    return ProductScores(
        product=product,
        image_threshold=image_threshold,
        pixel_threshold=map_threshold,
        map_min=map_min,
        map_max=map_max,
        images=images,
    )


def read_product_scores(path: Path) -> ProductScores:
    """The scores `rscin_products` wrote for one product."""
    raw = json.loads(Path(path).read_text())
    raw["images"] = tuple(ImageScore(**image) for image in raw["images"])
    return ProductScores(**raw)


def patch_score_rows(pool_paths: Sequence[Path]) -> dict[str, tuple[Path, int]]:
    """Where each image's patch scores live: image id -> (pool store, row)."""
    rows = {}
    for path in pool_paths:
        for row, image_id in enumerate(pool_layout(path).image_ids):
            rows[image_id] = (path, row)
    return rows


def pool_reference(pool_paths: Sequence[Path]) -> dict[str, str]:
    """The reference set and mode the pools were scored with (empty for zero-shot pools)."""
    for path in pool_paths:
        attrs = open_pool_store(path).attrs
        if "reference_set" in attrs:
            return {"reference_set": attrs["reference_set"], "reference_mode": attrs["reference_mode"]}
    return {}


def score_map(pool_path: Path, row: int, height: int, width: int) -> np.ndarray:
    """One image's anomaly map at (height, width) pixels: (height, width) float32 array (the pool store alone)."""
    layout = pool_layout(pool_path)
    patch = torch.from_numpy(open_pool_store(pool_path)["patch_scores"][row : row + 1])
    return upsample_maps(patch, layout.grid, (height, width))[0].numpy()
