"""Region rows labelled in cells (the fast path publish uses) equal the whole-mask labelling, to the bit."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from musc_tasks.core import upsample_maps
from musc_tasks.render import region_rows


def assert_same_rows(mask: np.ndarray, score_map: np.ndarray, working_side: int) -> None:
    plain = region_rows(mask, score_map, working_side=None)
    fast = region_rows(mask, score_map, working_side=working_side)
    assert plain.keys() == fast.keys()
    for name in plain:
        assert plain[name].dtype == fast[name].dtype, name
        np.testing.assert_array_equal(fast[name], plain[name], err_msg=name)


@settings(max_examples=150, deadline=None)
@given(
    arrays(np.int8, st.tuples(st.integers(1, 40), st.integers(1, 40)), elements=st.integers(0, 3)),
    st.integers(1, 12),
)
def test_cells_equal_the_plain_path_on_any_mask(levels, working_side):
    # Few levels: many regions, touching diagonals, rings around holes, and ties in max_score.
    assert_same_rows(levels >= 2, levels.astype(np.float32), working_side)


def test_cells_equal_the_plain_path_on_upsampled_maps():
    """Maps as publish makes them (a patch grid upsampled to a capture's size), at a few sizes."""
    rng = np.random.default_rng(12)
    for height, width, grid, working_side in [(480, 640, 16, 64), (1000, 333, 37, 100), (2048, 2448, 16, 1024)]:
        patch = rng.normal(0.0, 1.0, (1, grid * grid)).astype(np.float32)
        patch[0, rng.choice(grid * grid, 3)] += 4.0  # planted defects
        score_map = upsample_maps(torch.from_numpy(patch), (grid, grid), (height, width))[0].numpy()
        for threshold in (0.8, 2.0, 3.5):
            assert_same_rows(score_map > threshold, score_map, working_side)
