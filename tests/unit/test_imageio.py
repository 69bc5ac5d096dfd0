"""read_rgb and content_hash: each bad file gets its reason, each odd mode its RGB and note."""

import functools
import hashlib
import os
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from musc_tasks.imageio import ImageReadError, bounded_size, content_hash, read_rgb, read_rgb_reduced

from ..references import unreadable


def _pattern(height=24, width=32):
    """(H, W, 3) uint8 image with distinct rows and columns, so a rotation is detectable."""
    rows = np.arange(height, dtype=np.uint8)[:, None] * 7
    cols = np.arange(width, dtype=np.uint8)[None, :] * 3
    return np.stack([rows + cols * 0, cols + rows * 0, (rows + cols) % 251], axis=2).astype(np.uint8)


def _reason(path, **kwargs):
    with pytest.raises(ImageReadError) as info:
        read_rgb(path, **kwargs)
    assert info.value.path == os.fsdecode(path)
    assert str(info.value) == f"{os.fsdecode(path)}: {info.value.reason}"
    return info.value.reason


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".jpg"])
def test_plain_rgb_file_has_no_notes_and_is_detached(tmp_path, suffix):
    path = tmp_path / f"ok{suffix}"
    Image.fromarray(_pattern()).save(path, **({"quality": 100} if suffix == ".jpg" else {}))
    with Image.open(path) as reference:
        expected = np.asarray(reference.convert("RGB"))
    image, notes = read_rgb(path)
    # The pixels must not depend on the file any more: neither its name nor its bytes.
    path.write_bytes(b"\0" * path.stat().st_size)
    path.unlink()
    assert image.mode == "RGB" and image.size == (32, 24) and notes == []
    np.testing.assert_array_equal(np.asarray(image), expected)
    if suffix != ".jpg":
        np.testing.assert_array_equal(np.asarray(image), _pattern())


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    assert _reason(path) == "zero-byte file"


@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "PNG"), (".jpg", "JPEG")])
def test_truncated_file(tmp_path, suffix, fmt):
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert _reason(cut) == f"truncated {fmt} data"


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("operator notes: camera 3 was dirty today\n")
    assert _reason(path) == "not an image (text file named .png)"


def test_binary_garbage_is_not_an_image(tmp_path):
    path = tmp_path / "noise.jpg"
    path.write_bytes(bytes(range(256)) * 4)
    assert _reason(path).startswith("not an image (unrecognised data")


def test_gif_renamed_png_is_unsupported(tmp_path):
    path = tmp_path / "anim.png"
    Image.fromarray(_pattern()).save(path, format="GIF")
    assert _reason(path) == "unsupported format 'GIF'"


def test_grey_image(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((8, 9), 77, np.uint8)).save(path)
    image, notes = read_rgb(path)
    assert image.mode == "RGB" and notes == ["converted from L to RGB"]
    assert (np.asarray(image) == 77).all()


def test_16_bit_grey_scales_by_type_range_not_min_max(tmp_path):
    path = tmp_path / "deep.png"
    samples = np.array([[0, 257 * 100, 65535], [257, 257 * 200, 65535]], np.uint16)
    Image.fromarray(samples).save(path)
    assert Image.open(path).mode.startswith("I")
    image, notes = read_rgb(path)
    assert notes == [f"converted from {Image.open(path).mode} to RGB"]
    expected = np.array([[0, 100, 255], [1, 200, 255]], np.uint8)
    np.testing.assert_array_equal(np.asarray(image), np.repeat(expected[..., None], 3, axis=2))


def test_dark_16_bit_frame_stays_dark(tmp_path):
    path = tmp_path / "dark.png"
    Image.fromarray(np.array([[1000, 2000]], np.uint16)).save(path)
    image, _ = read_rgb(path)
    # Min-max scaling would have stretched these to 0 and 255.
    np.testing.assert_array_equal(np.asarray(image)[0, :, 0], [4, 8])


def test_rgba_drops_alpha(tmp_path):
    path = tmp_path / "rgba.png"
    rgba = np.concatenate([_pattern(), np.zeros((24, 32, 1), np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(path)
    image, notes = read_rgb(path)
    assert notes == ["alpha dropped (converted from RGBA to RGB)"]
    np.testing.assert_array_equal(np.asarray(image), _pattern())  # not composited on black


def test_palette_image(tmp_path):
    path = tmp_path / "palette.png"
    Image.fromarray(_pattern()).convert("P").save(path)
    image, notes = read_rgb(path)
    assert image.mode == "RGB" and notes == ["converted from P to RGB"]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_image(tmp_path, suffix):
    path = tmp_path / f"cmyk{suffix}"
    Image.new("CMYK", (10, 6), (0, 255, 255, 0)).save(path)
    image, notes = read_rgb(path)
    assert image.size == (10, 6) and notes == ["converted from CMYK to RGB"]
    red = np.asarray(image).reshape(-1, 3).mean(axis=0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, camera held rotated: show rotated 90 degrees clockwise
    Image.fromarray(_pattern(24, 32)).save(path, exif=exif, quality=95)
    image, notes = read_rgb(path)
    assert image.size == (24, 32)  # width and height swapped
    assert notes == ["EXIF orientation 6 applied"]
    upright = np.asarray(image).astype(int)
    stored = np.rot90(_pattern(24, 32), k=-1).astype(int)
    assert np.abs(upright - stored).mean() < 4  # JPEG loss only


def test_smaller_than_min_side(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(_pattern(12, 10)).save(path)
    assert _reason(path, min_side=16) == "smaller than min side 16: 10x12"
    assert read_rgb(path, min_side=10)[0].size == (10, 12)


def _patch_png_size(path, width, height):
    """Rewrite the IHDR width/height of a PNG and fix its CRC, leaving the pixel data tiny."""
    raw = bytearray(path.read_bytes())
    assert raw[12:16] == b"IHDR"
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    path = tmp_path / "bomb.png"
    Image.fromarray(_pattern(8, 8)).save(path)
    _patch_png_size(path, 40000, 40000)
    assert path.stat().st_size < 1000
    assert _reason(path) == ("declared size 40000x40000 exceeds the limit of 178956970 pixels (decompression bomb)")


def test_max_pixels_is_our_limit(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(_pattern(20, 30)).save(path)
    assert _reason(path, max_pixels=599) == "declared size 30x20 exceeds the limit of 599 pixels (decompression bomb)"
    assert read_rgb(path, max_pixels=600)[0].size == (30, 20)


def test_permission_denied(tmp_path):
    path = tmp_path / "locked.png"
    Image.fromarray(_pattern()).save(path)
    with unreadable(path):
        assert _reason(path) == "permission denied"
        with pytest.raises(ImageReadError, match="permission denied"):
            content_hash(path)


def test_missing_file_and_directory(tmp_path):
    assert _reason(tmp_path / "gone.png") == "file not found"
    assert _reason(tmp_path) == "is a directory"


def test_non_utf8_and_space_in_file_name(tmp_path):
    raw = os.path.join(os.fsencode(tmp_path), b"cam 1 \xff.png")
    Image.fromarray(_pattern()).save(os.fsdecode(raw), format="PNG")
    image, _ = read_rgb(os.fsdecode(raw))
    assert image.size == (32, 24)
    bad = os.path.join(os.fsencode(tmp_path), b"bad \xfe.png")
    with open(bad, "wb"):
        pass
    assert _reason(os.fsdecode(bad)) == "zero-byte file"


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="max_pixels"):
        read_rgb(tmp_path / "x.png", max_pixels=0)
    with pytest.raises(ValueError, match="min_side"):
        read_rgb(tmp_path / "x.png", min_side=0)


def test_error_survives_pickling():
    err = pickle.loads(pickle.dumps(ImageReadError("/a/b.png", "zero-byte file")))
    assert (err.path, err.reason, str(err)) == ("/a/b.png", "zero-byte file", "/a/b.png: zero-byte file")


def test_content_hash_matches_hashlib(tmp_path):
    path = tmp_path / "blob.bin"
    payload = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    path.write_bytes(payload)
    assert content_hash(path) == hashlib.sha256(payload).hexdigest()
    with pytest.raises(ImageReadError, match="file not found"):
        content_hash(tmp_path / "gone.bin")


@functools.cache
def _photo(height, width, seed=0):
    """A smooth (H, W, 3) uint8 picture with a little sensor noise, like a capture of a part."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([128 + 100 * np.sin(6 * x + 2 * y), 128 + 100 * np.cos(4 * y - 3 * x), 255 * x * (1 - y)], -1)
    noise = np.random.default_rng(seed).normal(0.0, 3.0, (height, width, 1))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _bounded_pixels(image, size):
    """What publish draws from: the image resized to its bounded size."""
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0), dtype=np.int16)


@pytest.mark.parametrize(
    ("width", "height", "long_side", "decoded"),
    [
        (800, 600, 100, (100, 75)),  # 1/8
        (800, 600, 200, (200, 150)),  # 1/4
        (800, 600, 400, (400, 300)),  # 1/2
        (801, 601, 400, (401, 301)),  # odd sides: rounded up, still at least the bounded size
        (800, 600, 500, (800, 600)),  # less than halved: decoded whole
        (800, 600, 1024, (800, 600)),  # within the bound: decoded whole
    ],
)
def test_reduced_jpeg_decode_is_the_smallest_dct_scale_at_least_the_bounded_size(
    tmp_path, width, height, long_side, decoded
):
    path = tmp_path / "capture.jpg"
    Image.fromarray(_photo(height, width)).save(path, quality=90)
    full, notes = read_rgb(path)
    image, full_size, reduced_notes = read_rgb_reduced(path, long_side)
    assert image.mode == "RGB" and image.size == decoded
    assert full_size == full.size == (width, height) and reduced_notes == notes == []
    bounded = bounded_size(full_size, long_side)
    assert image.width >= bounded[0] and image.height >= bounded[1]
    assert np.abs(_bounded_pixels(image, bounded) - _bounded_pixels(full, bounded)).mean() < 1.5


def test_reduced_jpeg_decode_chooses_its_scale_upright_and_applies_exif_orientation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 640 x 240, shown 240 x 640
    Image.fromarray(_photo(240, 640)).save(path, exif=exif, quality=95)
    full, notes = read_rgb(path)
    image, full_size, reduced_notes = read_rgb_reduced(path, 160)
    assert full.size == full_size == (240, 640) and bounded_size(full_size, 160) == (60, 160)
    # 1/4 in the stored orientation (160 x 60), turned upright; asked unturned, PIL would decode it whole
    assert image.size == (60, 160)
    assert reduced_notes == notes == ["EXIF orientation 6 applied"]
    assert np.abs(_bounded_pixels(image, (60, 160)) - _bounded_pixels(full, (60, 160))).mean() < 1.5


@pytest.mark.parametrize("progressive", [False, True])
def test_reduced_decode_refuses_a_truncated_5_mp_jpeg_as_the_full_decode_does(tmp_path, progressive):
    """The DCT-scaled decode still reads every scan of the file, so a cut one still fails."""
    whole = tmp_path / "whole.jpg"
    capture = Image.fromarray(_photo(205, 245)).resize((2448, 2048), Image.Resampling.BILINEAR)
    capture.save(whole, quality=90, progressive=progressive)
    assert read_rgb_reduced(whole, 1024)[0].size == (1224, 1024)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 4])
    assert _reason(cut) == "truncated JPEG data"
    with pytest.raises(ImageReadError) as info:
        read_rgb_reduced(cut, 1024)
    assert (info.value.path, info.value.reason) == (str(cut), "truncated JPEG data")


def test_reduced_decode_keeps_the_header_checks_and_other_formats_whole(tmp_path):
    path = tmp_path / "small.png"
    Image.fromarray(_pattern(20, 30)).save(path)
    for kwargs, reason in (
        ({"max_pixels": 599}, "declared size 30x20 exceeds the limit of 599 pixels (decompression bomb)"),
        ({"min_side": 21}, "smaller than min side 21: 30x20"),
    ):
        with pytest.raises(ImageReadError) as info:
            read_rgb_reduced(path, 8, **kwargs)
        assert info.value.reason == reason == _reason(path, **kwargs)
    image, full_size, notes = read_rgb_reduced(path, 8)  # PNG has no reduced decode
    assert full_size == image.size == (30, 20) and notes == []
    np.testing.assert_array_equal(np.asarray(image), _pattern(20, 30))
    with pytest.raises(ValueError, match="long_side"):
        read_rgb_reduced(path, 0)
