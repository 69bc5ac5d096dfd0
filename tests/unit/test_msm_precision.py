"""MSM with a low-precision GEMM (compute_dtype): float32 stays exact, bf16/fp16 stay close.

On the CPU the bf16/fp16 path multiplies the rounded tokens in float32 and rounds ``s - 1``
to the low dtype, which is what CUDA's addmm computes too (up to summation order), so these
tolerances are those of the GPU path. The CUDA test runs only where a GPU is present.
"""

import pytest
import torch

from musc_tasks.core import mutual_scores, nearest_similarities, pool_patch_scores

# Unit roundoff u of each dtype: rounding two unit vectors moves their inner product s by at
# most 2u + u^2 (Cauchy-Schwarz on the rounding errors); rounding the stored s - 1 adds at
# most u |s - 1|.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Score tolerances measured on the tokens below (C = 64, 20 seeds: worst 4.7e-3 for bf16,
# 5.5e-4 for fp16), with 2x margin. See mutual_scores' docstring for how they scale.
SCORE_ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def pool_like_tokens(n, length, channels, *, shared=0.8, seed=0):
    """Unit tokens that share a common part, so nearest distances are ~0.3 as in real pools."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(1, length, channels, generator=generator)
    noise = torch.randn(n, length, channels, generator=generator)
    return torch.nn.functional.normalize(shared * common + (1 - shared) * noise, dim=-1)


def test_float32_compute_dtype_is_the_default():
    tokens = pool_like_tokens(7, 12, 32, seed=1)
    assert torch.equal(mutual_scores(tokens, compute_dtype=torch.float32), mutual_scores(tokens))
    a, b = tokens[:3], tokens[3:]
    for explicit, default in zip(nearest_similarities(a, b, compute_dtype=torch.float32), nearest_similarities(a, b)):
        assert torch.equal(explicit, default)


def test_float64_compute_dtype_matches_float32():
    tokens = pool_like_tokens(6, 9, 16, seed=2)
    torch.testing.assert_close(
        mutual_scores(tokens, compute_dtype=torch.float64).float(), mutual_scores(tokens), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_similarities_move_by_at_most_the_rounding_bound(dtype):
    tokens = pool_like_tokens(5, 16, 64, seed=3)
    exact = nearest_similarities(tokens[:2].double(), tokens[2:].double())
    rounded = nearest_similarities(tokens[:2], tokens[2:], compute_dtype=dtype)
    u = UNIT_ROUNDOFF[dtype]
    for low, high in zip(rounded, exact):
        assert low.dtype == torch.float32
        bound = 2 * u + u * u + u * (1 - high + 2 * u + u * u) + 1e-6  # 1e-6: float32 sums
        assert ((low.double() - high).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_precision_scores_are_within_the_documented_tolerance(dtype, seed):
    tokens = pool_like_tokens(8, 16, 64, seed=seed)
    scores = mutual_scores(tokens, compute_dtype=dtype, tile=3)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, mutual_scores(tokens), atol=SCORE_ATOL[dtype], rtol=0)


def test_bf16_keeps_an_outlier_on_top():
    tokens = pool_like_tokens(6, 8, 64, seed=4)
    tokens[5, 3] = torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(5)), dim=0)
    scores = mutual_scores(tokens, compute_dtype=torch.bfloat16)
    assert scores.argmax().item() == 5 * 8 + 3


def test_pool_patch_scores_passes_compute_dtype_through():
    layer_tokens = [pool_like_tokens(6, 16, 32, seed=s) for s in (6, 7)]
    exact = pool_patch_scores(layer_tokens, (4, 4), (1, 3))
    assert torch.equal(pool_patch_scores(layer_tokens, (4, 4), (1, 3), compute_dtype=torch.float32), exact)
    rounded = pool_patch_scores(layer_tokens, (4, 4), (1, 3), compute_dtype=torch.bfloat16)
    assert not torch.equal(rounded, exact)  # the option reached the GEMM
    torch.testing.assert_close(rounded, exact, atol=SCORE_ATOL[torch.bfloat16], rtol=0)


def test_unsupported_compute_dtype_is_a_clear_error():
    tokens = pool_like_tokens(3, 4, 8)
    with pytest.raises(ValueError, match="compute_dtype"):
        mutual_scores(tokens, compute_dtype=torch.int8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_matches_the_cpu_emulation(dtype):
    tokens = pool_like_tokens(8, 16, 64, seed=8)
    on_gpu = mutual_scores(tokens.cuda(), compute_dtype=dtype).cpu()
    torch.testing.assert_close(on_gpu, mutual_scores(tokens, compute_dtype=dtype), atol=1e-5, rtol=0)
