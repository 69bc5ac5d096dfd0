"""The MuSc math as pure functions on arrays: no I/O, no Prefect, no globals.

tokens -> `aggregate_tokens` (LNAMD) -> `mutual_scores` (MSM) -> `upsample_maps` /
`image_scores` -> `rescore_images` (RsCIN) -> metrics.
With known-good references (paper A.6): `reference_pool_patch_scores` (few-shot, MuSc+, combined).
"""

from ._lnamd import aggregate_tokens
from ._maps import average_scores, image_scores, upsample_maps
from ._metrics import aupro, image_metrics, pixel_metrics, pro_musc
from ._msm import (
    auto_tile_images,
    mutual_scores,
    nearest_similarities,
    neighbour_count,
    scores_from_similarities,
)
from ._pool import block_aggregates, block_map_scores, block_pair_similarities, block_patch_scores, pool_patch_scores
from ._references import (
    REFERENCE_MODES,
    check_references,
    combined_scores,
    exceedance_auc,
    few_shot_neighbour_count,
    few_shot_scores_from_similarities,
    leave_one_out_distances,
    nearest_reference_distances,
    reference_only_patches,
    reference_pool_patch_scores,
    reference_scale,
    reference_score_maps,
)
from ._rscin import rescore_images
from ._split import split_by_type, split_pool

__all__ = [
    "REFERENCE_MODES",
    "check_references",
    "combined_scores",
    "exceedance_auc",
    "few_shot_neighbour_count",
    "few_shot_scores_from_similarities",
    "nearest_reference_distances",
    "reference_only_patches",
    "reference_pool_patch_scores",
    "reference_scale",
    "reference_score_maps",
    "aggregate_tokens",
    "aupro",
    "auto_tile_images",
    "average_scores",
    "block_aggregates",
    "block_map_scores",
    "block_pair_similarities",
    "block_patch_scores",
    "image_metrics",
    "image_scores",
    "leave_one_out_distances",
    "mutual_scores",
    "nearest_similarities",
    "neighbour_count",
    "pixel_metrics",
    "pool_patch_scores",
    "pro_musc",
    "rescore_images",
    "scores_from_similarities",
    "split_by_type",
    "split_pool",
    "upsample_maps",
]
