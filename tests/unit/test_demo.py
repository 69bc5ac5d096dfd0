"""make_demo_day: deterministic bytes, masks exactly for defective images, defect areas in range."""

import numpy as np
import pytest
from PIL import Image

from musc_tasks.catalog import scan_input
from musc_tasks.demo import DEFECT_KINDS, PRODUCTS, make_demo_day


def _tree_bytes(root):
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def day(tmp_path_factory):
    return make_demo_day(tmp_path_factory.mktemp("demo"), seed=3, images_per_product=6, defects_per_product=3, size=96)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = make_demo_day(tmp_path / "a", seed=7, images_per_product=4, defects_per_product=2, size=64)
    second = make_demo_day(tmp_path / "b", seed=7, images_per_product=4, defects_per_product=2, size=64)
    other = make_demo_day(tmp_path / "c", seed=8, images_per_product=4, defects_per_product=2, size=64)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")
    assert _tree_bytes(tmp_path / "a") != _tree_bytes(tmp_path / "c")
    assert [(i.product, i.path.name, i.defect_kind) for i in first.images] == [
        (i.product, i.path.name, i.defect_kind) for i in second.images
    ]
    assert len(other.images) == len(first.images)


def test_layout_and_counts(day):
    assert [image.product for image in day.images] == sorted(p for p in PRODUCTS for _ in range(6))
    for product in PRODUCTS:
        images = [image for image in day.images if image.product == product]
        assert sum(image.is_defective for image in images) == 3
        # Three defects per product: one of each kind.
        assert sorted(image.defect_kind for image in images if image.is_defective) == sorted(DEFECT_KINDS)
    for image in day.images:
        assert image.path.parent == day.input_dir / image.product
        with Image.open(image.path) as photo:
            assert photo.mode == "RGB" and photo.size == (96, 96)


def test_masks_exist_exactly_for_defective_images(day):
    written = sorted(day.ground_truth_dir.rglob("*_mask.png"))
    assert written == sorted(image.mask_path for image in day.images if image.is_defective)
    for image in day.images:
        if not image.is_defective:
            assert image.mask_path is None and image.defect_kind is None
            continue
        assert image.mask_path == day.ground_truth_dir / image.product / f"{image.path.stem}_mask.png"
        mask = np.asarray(Image.open(image.mask_path))
        assert mask.shape == (96, 96) and set(np.unique(mask)) == {0, 255}
        assert 0.01 <= (mask == 255).mean() <= 0.05, image


def test_mask_is_exactly_the_changed_pixels(tmp_path):
    # Photos and defects draw from separate streams, so a defect-free day is the clean reference.
    clean = make_demo_day(tmp_path / "clean", seed=1, images_per_product=3, defects_per_product=0, size=64)
    dirty = make_demo_day(tmp_path / "dirty", seed=1, images_per_product=3, defects_per_product=3, size=64)
    for before, after in zip(clean.images, dirty.images):
        photo = np.asarray(Image.open(after.path)).astype(int)
        changed = np.any(np.asarray(Image.open(before.path)).astype(int) != photo, axis=2)
        mask = np.asarray(Image.open(after.mask_path)) == 255
        np.testing.assert_array_equal(changed, mask)
        # Obvious to a person: the defect's colour is far from the scene's.
        assert np.abs(photo[mask].mean(axis=0) - photo[~mask].mean(axis=0)).max() > 25, after


def test_catalog_reads_the_demo_day(day):
    catalog = scan_input(day.input_dir)
    assert catalog.products == PRODUCTS and catalog.n_failed == 0
    assert all(len(catalog.ok_entries(product)) == 6 for product in PRODUCTS)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"images_per_product": 0}, "images_per_product"),
        ({"defects_per_product": 13}, "defects_per_product"),
        ({"defects_per_product": -1}, "defects_per_product"),
        ({"size": 32}, "size"),
    ],
)
def test_arguments_are_validated(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_demo_day(tmp_path, **kwargs)
