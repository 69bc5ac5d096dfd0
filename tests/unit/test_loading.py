"""Decoding ahead in threads (`load_blocks`) against the plain one-image-after-the-other path."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from musc_tasks.backbone import load_backbone
from musc_tasks.extract import MAX_RUN_BLOCKS, extract_tokens_to_store, extraction_runs
from musc_tasks.imageio import read_rgb
from musc_tasks.loading import load_blocks
from musc_tasks.preprocess import Squash
from musc_tasks.store import read_embeddings, read_token_rows, token_index


def write_images(folder: Path, n: int, *, broken: tuple[int, ...] = ()) -> list[tuple[str, str]]:
    """n JPEG and PNG files of varied sizes, the ``broken`` ones truncated; (image id, path) each."""
    rng = np.random.default_rng(3)
    images = []
    for i in range(n):
        pixels = rng.integers(0, 256, (150 + 7 * i, 190 - 5 * i, 3), dtype=np.uint8)
        path = folder / f"part{i:02d}.{'png' if i % 3 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        if i in broken:
            path.write_bytes(path.read_bytes()[:300])
        images.append((f"id{i:02d}", str(path)))
    return images


@pytest.mark.parametrize(("threads", "ahead"), [(1, 0), (3, 1), (2, 4)])
def test_threads_give_the_plain_path_blocks(tmp_path, threads, ahead):
    images = write_images(tmp_path, 11, broken=(2, 8, 9, 10))
    batches = [images[0:4], images[4:8], images[8:11]]  # the last block has nothing readable
    squash = Squash(56)
    plain = list(load_blocks(batches, squash, threads=0))
    fast = list(load_blocks(batches, squash, threads=threads, ahead=ahead))
    assert [b.image_ids for b in plain] == [("id00", "id01", "id03"), ("id04", "id05", "id06", "id07"), ()]
    assert [sorted(b.failed) for b in plain] == [["id02"], [], ["id08", "id09", "id10"]]
    assert plain[2].pixels is None and fast[2].pixels is None
    for want, got in zip(plain, fast):
        assert got.image_ids == want.image_ids and got.failed == want.failed
    for want, got in zip(plain[:2], fast[:2]):
        assert got.pixels.shape == (len(got.image_ids), 3, 56, 56)
        assert torch.equal(got.pixels, want.pixels)
    first = squash(read_rgb(images[0][1])[0])
    assert torch.equal(fast[0].pixels[0], first)


def test_stopping_early_cancels_the_rest(tmp_path):
    images = write_images(tmp_path, 12)
    loaded = load_blocks([images[i : i + 2] for i in range(0, 12, 2)], Squash(28), threads=2, ahead=1)
    assert next(loaded).image_ids == ("id00", "id01")
    loaded.close()  # returns once the blocks in flight are done; nothing is left running
    with pytest.raises(ValueError, match="threads must be >= 0"):
        next(load_blocks([], Squash(28), threads=-1))


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
def test_prefetched_extraction_writes_the_tokens_of_the_plain_loop(tmp_path, tiny_spec):
    images = write_images(tmp_path, 10, broken=(5,))
    backbone = load_backbone(tiny_spec, device="cpu")
    store = tmp_path / "tokens.zarr"
    result = extract_tokens_to_store(store, images, lambda: backbone, shard_images=4)
    assert (result.extracted, result.failed) == (9, {"id05": "truncated PNG data"})
    # the reference: one image after the other, then one forward pass per block, as before prefetching
    index = token_index(store)
    for start in range(0, 10, 4):
        batch = [(i, p) for i, p in images[start : start + 4] if i != "id05"]
        pixels = torch.stack([backbone.preprocess(read_rgb(path)[0]) for _, path in batch])
        layer_tokens, embeddings = backbone.extract(pixels)
        rows = [index[i] for i, _ in batch]
        for stored, computed in zip(read_token_rows(store, rows), layer_tokens):
            assert np.array_equal(stored, computed.numpy().astype(np.float16).astype(np.float32))
        assert np.array_equal(read_embeddings(store, rows), embeddings.numpy())


def test_extraction_runs_cover_the_blocks_once_in_order():
    for first, stop, workers in [(1, 2, 2), (1, 13, 2), (0, 125, 2), (3, 40, 8), (1, 5, 16), (1, 100, 1)]:
        runs = extraction_runs(first, stop, workers)
        assert [b for run in runs for b in range(run.start, run.stop)] == list(range(first, stop))
        sizes = [run.stop - run.start for run in runs]
        assert all(1 <= size <= MAX_RUN_BLOCKS for size in sizes)
        assert len(runs) >= min(workers, stop - first)
        # Shrinking to single blocks, so the night's last tasks are short whatever the split.
        assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 1
    assert [run.stop - run.start for run in extraction_runs(1, 42, 2)] == [8, 8, 6, 4, 3, 3, 2] + [1] * 7
