"""Property tests for musc_tasks.core._msm: a CPU's strips of a tile equal its one GEMM to the bit (1 or 2 threads)."""

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from musc_tasks.core import _msm, nearest_similarities

SETTINGS = settings(max_examples=60, deadline=None)
COMPUTE_DTYPES = st.sampled_from([None, torch.float64, torch.bfloat16, torch.float16])


def unit_tokens(n, length, channels, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, length, channels, generator=generator), dim=-1)


THREADS = st.sampled_from([1, 2])  # a Dask worker's one thread; the in-process engine's several


@contextlib.contextmanager
def torch_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def blas_splits_rows_exactly() -> bool:
    """Whether this CPU's float32 GEMM gives a row the same bits in a strip of >= 64 rows as in the whole.

    On 1 or 2 threads, for the strip and for the whole. The strips' equality to one GEMM rests
    on it (`_msm._tile_similarities`): MKL on the CPUs measured does, over the shapes the tests
    draw; a BLAS that does not still gets the same maxima up to float32 rounding, which is what
    the tests then hold it to.
    """
    generator = torch.Generator().manual_seed(0)
    for channels in (1, 2, 3, 5, 8, 12, 128, 768):
        rows = torch.randn(400, channels, generator=generator)
        for n_columns in (64, 90, 196, 360, 1369):
            columns = torch.randn(channels, n_columns, generator=generator)
            with torch_threads(1):
                whole = rows @ columns
            for threads in (1, 2):
                with torch_threads(threads):
                    for start, stop in ((0, 64), (64, 129), (129, 200), (200, 328), (328, 400)):
                        if not torch.equal(rows[start:stop] @ columns, whole[start:stop]):
                            return False
                    if not torch.equal(rows @ columns, whole):
                        return False
    return True


EXACT = blas_splits_rows_exactly()


def assert_equal(got, expected, compute_dtype):
    # without EXACT, a float32 product one rounding apart can round to the neighbouring bf16 or fp16
    tolerance = 2**-7 if compute_dtype in (torch.bfloat16, torch.float16) else 1e-5
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        difference = (g.double() - e.double()).abs().max().item() if g.numel() else 0.0
        if EXACT:
            assert torch.equal(g, e), f"max difference {difference}"
        else:  # a BLAS whose entries depend on the row count: equal up to the GEMM's rounding
            assert difference <= tolerance, f"max difference {difference}"


@SETTINGS
@given(
    st.integers(1, 4), st.integers(1, 4), st.integers(16, 90), st.integers(1, 12), st.data(),
    COMPUTE_DTYPES.filter(lambda dtype: dtype is not torch.float64), THREADS, st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_strips_equal_the_whole_tile(n_a, n_b, length, channels, data, compute_dtype, threads, seed):
    """Strips of at least 64 rows and tiles of at least 64 columns: the float32 GEMMs the CPU splits."""
    n_rows = n_a * length
    assume(n_rows >= 2 * 64 and n_b * length >= 64)
    n_strips = data.draw(st.integers(2, n_rows // 64))
    tokens = unit_tokens(n_a + n_b, length, channels, seed)
    a, b = tokens[:n_a], tokens[n_a:]
    with torch_threads(1):
        expected = _msm._whole_tile_similarities(a, b, compute_dtype)
    with torch_threads(threads):
        assert_equal(_msm._strip_similarities(a, b, compute_dtype, n_strips=n_strips), expected, compute_dtype)


@SETTINGS
@given(
    st.integers(1, 7), st.integers(1, 5), st.integers(1, 80), st.integers(1, 12), st.integers(1, 6),
    st.integers(1, 1 << 16), st.booleans(), COMPUTE_DTYPES, THREADS, st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_tiles_in_strips_equal_tiles_in_one_gemm(
    n_a, n_b, length, channels, tile, strip_bytes, same, dtype, threads, seed
):
    """Tiles that do not divide the blocks, one-image sides, the same block's upper triangle, strips of any size."""
    tokens = unit_tokens(n_a + n_b, length, channels, seed)
    a = tokens[:n_a]
    b = a if same else tokens[n_a:]
    with mock.patch.object(_msm, "_tile_similarities", _msm._whole_tile_similarities), torch_threads(1):
        expected = nearest_similarities(a, b, compute_dtype=dtype, tile=tile)
    with mock.patch.object(_msm, "_STRIP_BYTES", strip_bytes), torch_threads(threads):
        got = nearest_similarities(a, b, compute_dtype=dtype, tile=tile)
    assert_equal(got, expected, dtype)


@pytest.mark.parametrize(
    "length, channels, n_a, n_b", [(196, 768, 20, 12), (1024, 128, 3, 2), (1024, 128, 4, 4), (1369, 128, 3, 2)]
)
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_default_strips_equal_one_gemm_at_real_shapes(length, channels, n_a, n_b, compute_dtype, threads):
    tokens = unit_tokens(n_a + n_b, length, channels, seed=length)
    a, b = tokens[:n_a], tokens[n_a:]
    strips = mock.patch.object(_msm, "_strip_similarities", wraps=_msm._strip_similarities)
    with strips as called:
        for tile in (None, 7):
            with mock.patch.object(_msm, "_tile_similarities", _msm._whole_tile_similarities), torch_threads(1):
                expected = nearest_similarities(a, b, compute_dtype=compute_dtype, tile=tile)
            with torch_threads(threads):
                got = nearest_similarities(a, b, compute_dtype=compute_dtype, tile=tile)
            assert_equal(got, expected, compute_dtype)
    # several threads split only a tile whose product is over glibc's largest mmap threshold
    tiles = (_msm.auto_tile_images(length), 7)
    mapped = any(4 * min(n_a, t) * min(n_b, t) * length**2 > _msm._MMAP_THRESHOLD_MAX for t in tiles)
    assert (called.call_count > 0) == (threads == 1 or mapped)


def strips_taken(block_a, block_b, threads) -> list[int]:
    """How many strips each tile of `nearest_similarities` took on ``threads`` (tiles in one GEMM left out)."""
    with (
        torch_threads(threads),
        mock.patch.object(_msm, "_strip_similarities", wraps=_msm._strip_similarities) as called,
    ):
        nearest_similarities(block_a, block_b)
    return [call.kwargs["n_strips"] for call in called.call_args_list]


@pytest.mark.parametrize("threads, n_strips", [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)])
def test_strips_hold_about_4_mib_of_product_per_thread(threads, n_strips):
    """Four images of L = 1024 against four: 4096 columns, so 4 MiB of float32 product is 256 rows."""
    tokens = unit_tokens(8, 1024, 16, seed=0)
    assert strips_taken(tokens[:4], tokens[4:], threads) == ([n_strips] if n_strips > 1 else [])


@pytest.mark.parametrize("threads, splits", [(1, True), (2, False), (4, False)])
def test_several_threads_split_only_a_mapped_product(threads, splits):
    """Two images of L = 1369 against two: a 30 MB product, under the 32 MiB that glibc maps apart."""
    tokens = unit_tokens(4, 1369, 16, seed=0)
    assert bool(strips_taken(tokens[:2], tokens[2:], threads)) == splits


def test_float64_and_narrow_tiles_keep_one_gemm():
    tokens = unit_tokens(4, 1369, 16, seed=0)
    with mock.patch.object(_msm, "_strip_similarities") as called:
        nearest_similarities(tokens[:2].double(), tokens[2:].double())
        nearest_similarities(tokens[:3, :40], tokens[3:, :40])  # 40 columns: below the 64 a strip needs
    called.assert_not_called()
