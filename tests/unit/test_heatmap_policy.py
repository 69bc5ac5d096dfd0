"""The heatmap size policy: full resolution where it serves, a bounded long side elsewhere."""

import numpy as np
from PIL import Image

from musc_tasks.config import OutputPolicy
from musc_tasks.maps import upsample_map
from musc_tasks.publish import _overlay
from musc_tasks.render import BOX_RGB, region_rows
from musc_tasks.rscin import ProductScores


def _case(width=600, height=400):
    image = Image.fromarray(np.full((height, width, 3), 128, np.uint8))
    patch_map = np.zeros((8, 8), np.float16)
    patch_map[2:4, 5:7] = 1.0
    pixel_scores = upsample_map(patch_map, (height, width))
    mask = pixel_scores > 0.5
    scores = ProductScores("p", 0.5, 0.5, 0.0, 1.0, ())
    return image, patch_map, pixel_scores, mask, region_rows(mask, pixel_scores), scores


def test_flagged_and_top_ranks_keep_full_resolution():
    image, patch_map, pixel_scores, mask, regions, scores = _case()
    policy = OutputPolicy(long_side=150)
    overlay = _overlay(image, image.size, patch_map, pixel_scores, mask, regions, scores, policy, full_size=True)
    assert overlay.shape == (400, 600, 3)


def test_other_heatmaps_are_bounded_and_keep_their_regions():
    image, patch_map, pixel_scores, mask, regions, scores = _case()
    overlay = _overlay(
        image, image.size, patch_map, pixel_scores, mask, regions, scores, OutputPolicy(long_side=150), full_size=False
    )
    assert overlay.shape == (100, 150, 3)
    coloured = np.argwhere((overlay == BOX_RGB).all(-1))
    y0, x0 = coloured.min(0)
    y1, x1 = coloured.max(0) + 1
    scale = 0.25
    # The drawn box surrounds the region's box scaled down, within the line width.
    assert x0 <= regions["bbox_x0"][0] * scale <= x0 + 2 and x1 - 2 <= regions["bbox_x1"][0] * scale <= x1
    assert y0 <= regions["bbox_y0"][0] * scale <= y0 + 2 and y1 - 2 <= regions["bbox_y1"][0] * scale <= y1


def test_small_images_are_never_enlarged():
    image, patch_map, pixel_scores, mask, regions, scores = _case(100, 80)
    overlay = _overlay(
        image, image.size, patch_map, pixel_scores, mask, regions, scores, OutputPolicy(long_side=1024), full_size=False
    )
    assert overlay.shape == (80, 100, 3)
