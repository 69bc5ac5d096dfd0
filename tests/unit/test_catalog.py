"""scan_input: layout, order, duplicates, broken and odd files, empty and missing folders."""

import errno
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from musc_tasks.catalog import Catalog, scan_input

from ..references import unreadable


def _png(path, seed=0, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


@pytest.fixture
def day(tmp_path):
    """INPUT with two products, one empty product folder, loose top-level images and junk."""
    root = tmp_path / "day 2026-11-23"
    _png(root / "bottle" / "b.png", seed=1)
    _png(root / "bottle" / "a.png", seed=2, size=(30, 10))
    (root / "bottle" / "copy of a.png").write_bytes((root / "bottle" / "a.png").read_bytes())
    _png(root / "bottle" / "line 2" / "c.PNG", seed=3)
    (root / "bottle" / "readme.txt").write_text("not catalogued")
    Image.new("RGB", (8, 8)).save(root / "bottle" / "anim.gif")  # other suffix: ignored
    (root / "bottle" / "broken.jpg").write_bytes(b"")
    _png(root / "cable" / "a.png", seed=2, size=(30, 10))  # same bytes as bottle/a.png, other product
    (root / "empty").mkdir()
    (root / "junk only").mkdir()
    (root / "junk only" / "log.txt").write_text("x")
    _png(root / "loose.png", seed=4)
    return root


def test_layout_order_and_products(day):
    catalog = scan_input(day)
    assert isinstance(catalog, Catalog)
    keys = [(entry.product, entry.relpath) for entry in catalog.entries]
    assert keys == sorted(keys)
    assert keys == [
        ("bottle", "bottle/a.png"),
        ("bottle", "bottle/b.png"),
        ("bottle", "bottle/broken.jpg"),
        ("bottle", "bottle/copy of a.png"),
        ("bottle", "bottle/line 2/c.PNG"),
        ("cable", "cable/a.png"),
        ("day 2026-11-23", "loose.png"),
    ]
    assert catalog.products == ("bottle", "cable", "day 2026-11-23")
    assert catalog.empty_products == ("empty", "junk only")
    assert catalog.input_dir == str(day)
    for entry in catalog.entries:
        assert entry.path == str(day / entry.relpath) and os.path.isabs(entry.path)


def test_entry_contents(day):
    entries = {entry.relpath: entry for entry in scan_input(day).entries}
    first = entries["bottle/a.png"]
    assert first.status == "ok" and (first.width, first.height) == (30, 10)
    assert first.image_id == hashlib.sha256((day / "bottle" / "a.png").read_bytes()).hexdigest()
    assert first.reason is None and first.notes == () and first.duplicate_of is None
    broken = entries["bottle/broken.jpg"]
    assert broken.status == "failed" and broken.reason == "zero-byte file"
    assert broken.width is None and broken.height is None


def test_duplicates_within_a_product(day):
    catalog = scan_input(day)
    entries = {entry.relpath: entry for entry in catalog.entries}
    copy = entries["bottle/copy of a.png"]
    assert copy.duplicate_of == entries["bottle/a.png"].path
    assert copy.image_id == entries["bottle/a.png"].image_id
    assert copy.status == "ok" and (copy.width, copy.height) == (30, 10)
    # Same bytes in another product is another pool: not a duplicate.
    assert entries["cable/a.png"].duplicate_of is None
    assert [entry.relpath for entry in catalog.ok_entries("bottle")] == [
        "bottle/a.png",
        "bottle/b.png",
        "bottle/line 2/c.PNG",
    ]
    assert catalog.n_failed == 1 and catalog.n_images == 7


def test_duplicate_is_decoded_once(day, monkeypatch):
    import musc_tasks.catalog as catalog_module

    decoded = []
    real = catalog_module.read_rgb

    def _counting(path, **kwargs):
        decoded.append(os.path.basename(path))
        return real(path, **kwargs)

    monkeypatch.setattr(catalog_module, "read_rgb", _counting)
    scan_input(day / "bottle")
    assert sorted(decoded) == ["a.png", "b.png", "broken.jpg", "c.PNG"]


def test_image_files_directly_under_input(tmp_path):
    root = tmp_path / "line7"
    _png(root / "x.png")
    Image.new("RGB", (8, 9)).save(root / "y.BMP")
    catalog = scan_input(root)
    assert catalog.products == ("line7",)
    assert [entry.relpath for entry in catalog.entries] == ["x.png", "y.BMP"]
    assert [entry.status for entry in catalog.entries] == ["ok", "ok"]


def test_broken_files_are_catalogued_with_reasons(tmp_path):
    root = tmp_path / "in"
    good = _png(root / "p" / "good.png", size=(64, 64))
    (root / "p" / "cut.png").write_bytes(good.read_bytes()[:200])
    (root / "p" / "text.tiff").write_text("hello")
    Image.new("RGB", (8, 8)).save(root / "p" / "gif.jpeg", format="GIF")
    _png(root / "p" / "tiny.png", size=(5, 4))
    reasons = {entry.relpath: entry.reason for entry in scan_input(root, min_side=8).entries}
    assert reasons == {
        "p/cut.png": "truncated PNG data",
        "p/gif.jpeg": "unsupported format 'GIF'",
        "p/good.png": None,
        "p/text.tiff": "not an image (text file named .tiff)",
        "p/tiny.png": "smaller than min side 8: 5x4",
    }


def test_max_pixels_is_passed_on(tmp_path):
    _png(tmp_path / "in" / "p" / "big.png", size=(40, 30))
    (entry,) = scan_input(tmp_path / "in", max_pixels=1000).entries
    assert entry.status == "failed" and "decompression bomb" in entry.reason


def test_unreadable_bytes_get_a_path_id(tmp_path):
    path = _png(tmp_path / "in" / "p" / "locked.png")
    with unreadable(path):
        catalog = scan_input(tmp_path / "in")
    (entry,) = catalog.entries
    assert entry.status == "failed" and entry.reason == "permission denied"
    assert entry.image_id == "path:" + hashlib.sha256(os.fsencode(str(path))).hexdigest()
    assert catalog.ok_entries("p") == ()


def test_non_utf8_and_spaces_in_names(tmp_path):
    root = tmp_path / "in"
    _png(root / "p" / "ok.png")
    raw_dir = os.path.join(os.fsencode(root), b"p", b"line \xe9")
    os.makedirs(raw_dir)
    raw = os.path.join(raw_dir, b"cam 1 \xff.png")
    Image.new("RGB", (7, 5)).save(os.fsdecode(raw), format="PNG")
    catalog = scan_input(root)
    odd = next(entry for entry in catalog.entries if entry.relpath != "p/ok.png")
    assert os.fsencode(odd.path) == raw and odd.relpath == os.fsdecode(b"p/line \xe9/cam 1 \xff.png")
    assert odd.status == "ok" and (odd.width, odd.height) == (7, 5)
    # JSON output must not crash on the undecodable bytes; they show escaped.
    dumped = json.loads(catalog.model_dump_json())
    assert any(entry["relpath"] == "p/line \\xe9/cam 1 \\xff.png" for entry in dumped["entries"])


def test_symlinks_never_lead_outside_input(tmp_path):
    root = tmp_path / "in"
    _png(root / "p" / "own.png", seed=1)
    outside = _png(tmp_path / "elsewhere" / "secret.png", seed=2)
    os.symlink(outside, root / "p" / "link.png")
    os.symlink(tmp_path / "elsewhere", root / "p" / "linked dir")
    os.symlink(root / "p" / "own.png", root / "p" / "inner.png")
    entries = {entry.relpath: entry for entry in scan_input(root).entries}
    assert set(entries) == {"p/inner.png", "p/link.png", "p/own.png"}  # "linked dir" not entered
    assert entries["p/link.png"].status == "failed"
    assert entries["p/link.png"].reason == "symlink points outside the input folder"
    # A link inside INPUT is followed; it sorts first, so the real file is the duplicate.
    assert entries["p/own.png"].duplicate_of == entries["p/inner.png"].path


def test_empty_input(tmp_path):
    catalog = scan_input(tmp_path)
    assert catalog.entries == () and catalog.products == () and catalog.empty_products == ()


def test_missing_input_or_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        scan_input(tmp_path / "nowhere")
    _png(tmp_path / "file.png")
    with pytest.raises(NotADirectoryError, match="file.png"):
        scan_input(tmp_path / "file.png")


def test_scan_is_deterministic(day):
    assert scan_input(day) == scan_input(day)


def test_threads_do_not_change_the_catalogue(day, tmp_path):
    """Hashing and decoding on threads gives the one-thread catalogue: order, ids, duplicates, failures."""
    for i in range(24):  # enough files for every thread to take several, copies among them
        path = _png(day / "many" / f"{i:02d}.png", seed=100 + i % 9, size=(16 + i % 5, 12))
        if i % 4 == 0:
            (day / "many" / f"copy {i:02d}.png").write_bytes(path.read_bytes())
    (day / "many" / "cut.png").write_bytes((day / "many" / "00.png").read_bytes()[:60])
    (day / "many" / "cut again.png").write_bytes((day / "many" / "00.png").read_bytes()[:60])
    os.symlink(_png(tmp_path / "outside.png"), day / "many" / "out.png")
    serial = scan_input(day, threads=1)
    assert serial.n_failed == 4 and sum(e.duplicate_of is not None for e in serial.entries) == 8
    for threads in (2, 5):
        assert scan_input(day, threads=threads) == serial


def test_unlistable_folder_is_reported_not_empty(tmp_path, monkeypatch):
    root = tmp_path / "in"
    _png(root / "p" / "ok.png")
    locked = root / "q" / "shift 2"
    _png(locked / "hidden.png")
    locked.chmod(0)
    try:
        try:
            os.listdir(locked)
        except PermissionError:
            pass
        else:
            # Running as root: the OS will not refuse, so make the listing refuse the way it would.
            real_scandir = os.scandir

            def _scandir(path="."):
                if os.fspath(path) == str(locked):
                    raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
                return real_scandir(path)

            monkeypatch.setattr(os, "scandir", _scandir)
        catalog = scan_input(root)
    finally:
        locked.chmod(0o755)
    assert catalog.unreadable_dirs == ("q/shift 2",)
    assert catalog.empty_products == () and catalog.products == ("p",)
