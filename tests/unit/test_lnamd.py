"""LNAMD against a plain loop over positions and neighbours."""

import pytest
import torch

from musc_tasks.core import aggregate_tokens


def lnamd_by_loops(tokens, grid, r):
    n, length, c = tokens.shape
    h, w = grid
    out = torch.empty(n, length, c, dtype=torch.float64)
    for i in range(n):
        maps = tokens[i].double().T.reshape(c, h, w)
        mean, var = maps.mean(), maps.var(unbiased=False)
        maps = (maps - mean) / torch.sqrt(var + 1e-5)
        half = (r - 1) // 2
        for y in range(h):
            for x in range(w):
                total = torch.zeros(c, dtype=torch.float64)
                for dy in range(-half, half + 1):
                    for dx in range(-half, half + 1):
                        if 0 <= y + dy < h and 0 <= x + dx < w:
                            total += maps[:, y + dy, x + dx]
                vec = total / (r * r)  # padded zeros count in the mean
                out[i, y * w + x] = vec / vec.norm()
    return out


@pytest.mark.parametrize("r", [1, 3, 5])
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_matches_loops_including_borders(r, grid):
    torch.manual_seed(r)
    tokens = torch.randn(2, grid[0] * grid[1], 6) * 3 + 1
    expected = lnamd_by_loops(tokens, grid, r)
    torch.testing.assert_close(aggregate_tokens(tokens, grid, r).double(), expected, atol=1e-5, rtol=0)


def test_one_mean_and_variance_per_image_not_per_token():
    # shifting and scaling an image's whole map leaves LNAMD unchanged...
    torch.manual_seed(0)
    tokens = torch.randn(1, 9, 4)
    base = aggregate_tokens(tokens, (3, 3), 3)
    torch.testing.assert_close(aggregate_tokens(tokens * 5 + 2, (3, 3), 3), base, atol=1e-5, rtol=0)
    # ...but shifting a single token changes the others through the shared statistics
    shifted = tokens.clone()
    shifted[0, 0] += 10
    assert not torch.allclose(aggregate_tokens(shifted, (3, 3), 1)[0, 4], base[0, 4], atol=1e-3)


def test_unit_norm_output():
    tokens = torch.randn(3, 16, 8)
    norms = aggregate_tokens(tokens, (4, 4), 5).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize(
    "grid, r, message",
    [((3, 3), 3, "grid"), ((4, 4), 2, "odd"), ((4, 4), 0, "odd")],
)
def test_rejects_bad_arguments(grid, r, message):
    with pytest.raises(ValueError, match=message):
        aggregate_tokens(torch.randn(1, 16, 4), grid, r)
