"""Property tests for musc_tasks.store.read_rows: rows read as slices equal Zarr's orthogonal selection."""

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from musc_tasks.store import read_rows

SETTINGS = settings(max_examples=60, deadline=None)


def sharded_array(n_rows, shard_rows, seed):
    """(n_rows, 5, 3) float16, one chunk per row and one shard per ``shard_rows`` rows, as the token stores."""
    array = zarr.create_array(
        store=zarr.storage.MemoryStore(),
        shape=(n_rows, 5, 3),
        chunks=(1, 5, 3),
        shards=(shard_rows, 5, 3),
        dtype="float16",
        fill_value=0,
    )
    array[:] = np.random.default_rng(seed).standard_normal((n_rows, 5, 3)).astype(np.float16)
    return array


@st.composite
def arrays_and_rows(draw):
    n_rows = draw(st.integers(1, 30))
    shard_rows = draw(st.sampled_from([1, 3, 8]))
    rows = draw(st.lists(st.integers(0, n_rows - 1), max_size=40))  # any order, repeats
    return n_rows, shard_rows, rows, draw(st.integers(0, 2**16))


@SETTINGS
@given(arrays_and_rows())
def test_rows_read_as_slices_equal_the_orthogonal_selection(case):
    n_rows, shard_rows, rows, seed = case
    array = sharded_array(n_rows, shard_rows, seed)
    expected = array.get_orthogonal_selection((np.asarray(rows, dtype=np.int64), slice(None), slice(None)))
    got = read_rows(array, rows)
    assert got.dtype == expected.dtype and got.shape == (len(rows), 5, 3)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("rows", [[10], [-1], [0, 3, 10]])
def test_a_row_out_of_range_is_refused(rows):
    with pytest.raises(IndexError):
        read_rows(sharded_array(10, 3, 0), rows)
