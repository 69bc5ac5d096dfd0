"""Every kind of bad input in one real flow run: each file ends with a status and a reason."""

import io
import os
import shutil
import struct
import zlib
from datetime import date

import numpy as np
import pytest
from PIL import Image

from flows.score import score_captures
from musc_tasks import tables
from musc_tasks.config import ScoringParams

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*RANDOM weights")]


def png_bytes(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png():
    """A valid small PNG whose header declares 100000 x 100000 pixels."""
    data = bytearray(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    ihdr = data[12:29]  # type + 13 bytes of header fields
    patched = b"IHDR" + struct.pack(">II", 100_000, 100_000) + bytes(ihdr[12:17])
    data[12:29] = patched
    data[29:33] = struct.pack(">I", zlib.crc32(patched))
    return bytes(data)


@pytest.fixture(scope="module")
def bad_day(demo_day, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = [i for i in demo_day.images if i.product == "brick" and not i.is_defective][:6]
    product = root / "brick"
    product.mkdir()
    for image in good:
        shutil.copy(image.path, product / image.path.name)
    rgb = np.asarray(Image.open(good[0].path).convert("RGB"))
    files = {
        "zero.png": b"",
        "truncated.png": png_bytes(rgb)[:300],
        "text.png": b"this is not an image\n",
        "grey.png": png_bytes(rgb[..., 0]),
        "sixteen.png": None,
        "rgba.png": png_bytes(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])),
        "tiny.png": png_bytes(rgb[:5, :5]),
        "bomb.png": bomb_png(),
        "with space.png": png_bytes(rgb[::-1]),
        "copy.png": (product / good[0].path.name).read_bytes(),
    }
    for name, payload in files.items():
        if payload is not None:
            (product / name).write_bytes(payload)
    Image.fromarray(rgb[..., 1].astype(np.uint16) * 257).save(product / "sixteen.png")
    truncated_jpeg = io.BytesIO()
    Image.fromarray(rgb).save(truncated_jpeg, format="JPEG")
    (product / "truncated.jpg").write_bytes(truncated_jpeg.getvalue()[:400])
    Image.fromarray(rgb).convert("CMYK").save(product / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(product / "palette.png")
    (product / os.fsdecode(b"caf\xe9.png")).write_bytes(png_bytes(rgb[:, ::-1]))
    (product / "notes.txt").write_text("ignored: not an image suffix")
    (root / "empty_product").mkdir()
    lonely = root / "lonely"
    lonely.mkdir()
    shutil.copy(good[1].path, lonely / "only.png")
    few = root / "few"
    few.mkdir()
    for image in good[:3]:
        shutil.copy(image.path, few / image.path.name)
    locked = product / "locked.png"
    locked.write_bytes(png_bytes(rgb))
    locked.chmod(0)
    return root, good[0].path.name


def test_each_bad_file_gets_a_status_and_the_run_goes_on(prefect_api, dask_address, bad_day, tiny_backbone, tmp_path):
    bad_day, copied_name = bad_day
    out = tmp_path / "out"
    summary = score_captures(
        input_dir=str(bad_day),
        out_dir=str(out),
        run_date=date(2026, 11, 22),
        backbone=tiny_backbone,
        scoring=ScoringParams(task_images=4),
        device="cpu",
        dask_address=dask_address,
    )
    rows = tables.read_table(out / "tables" / "scores")
    brick = rows[rows["product"] == "brick"]
    by_name = {os.path.basename(p): r for p, r in zip(brick["path"], brick.to_dict("records"))}

    def status(name):
        return by_name[name]["status"], by_name[name]["error"] or "", by_name[name]["note"] or ""

    assert status("zero.png")[:2] == ("failed", "zero-byte file")
    for name, words in {
        "truncated.png": "truncat",
        "truncated.jpg": "truncat",
        "text.png": "not an image",
        "tiny.png": "smaller",
        "bomb.png": "decompression bomb",
    }.items():
        got, reason, _ = status(name)
        assert got == "failed" and words in reason.lower(), (name, reason)
    for name in ("grey.png", "sixteen.png", "rgba.png", "cmyk.jpg", "palette.png"):
        got, _, note = status(name)
        assert got == "scored" and "converted" in note.lower(), (name, note)
    assert status("with space.png")[0] == "scored"
    got, _, note = status("caf\\xe9.png")  # tables hold UTF-8: the undecodable byte is escaped
    assert got == "scored" and "not valid UTF-8" in note
    copy = by_name["copy.png"]
    original = by_name[copied_name]
    assert copy["status"] == "scored" and "same content" in copy["note"]
    assert copy["score"] == original["score"] and copy["rank"] == original["rank"]
    if os.geteuid() != 0:  # root reads a chmod-000 file anyway
        assert status("locked.png")[0] == "failed" and "permission" in status("locked.png")[1].lower()
    assert "notes.txt" not in by_name

    lonely = rows[rows["product"] == "lonely"].iloc[0]
    assert lonely["status"] == "not_scored" and "at least 2" in lonely["error"]
    few = rows[rows["product"] == "few"]
    assert (few["status"] == "scored").all() and few["note"].str.contains("only 3 distinct images").all()
    assert "empty_product" not in set(rows["product"])
    assert summary.n_failed == (rows["status"] == "failed").sum() >= 5
    assert summary.n_scored == (rows["status"] == "scored").sum()


def test_missing_input_and_read_only_out_are_clear_errors(prefect_api, tiny_backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        score_captures(
            input_dir=str(tmp_path / "does-not-exist"),
            out_dir=str(tmp_path / "out"),
            backbone=tiny_backbone,
            device="cpu",
        )
    if os.geteuid() == 0:
        return  # root writes anywhere; the probe is exercised as an ordinary user
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    with pytest.raises(PermissionError, match="not writable"):
        score_captures(input_dir=str(tmp_path), out_dir=str(read_only / "out"), backbone=tiny_backbone, device="cpu")


def test_empty_night_fails_the_flow_run_and_records_no_input(prefect_api, tiny_backbone, tmp_path):
    """A camera upload that failed is an alarm: a failed flow run and a runs row saying no_input."""
    from prefect.client.orchestration import get_client

    (tmp_path / "night" / "bolt").mkdir(parents=True)
    out = tmp_path / "out"
    state = score_captures(
        input_dir=str(tmp_path / "night"),
        out_dir=str(out),
        run_date=date(2026, 11, 22),
        backbone=tiny_backbone,
        device="cpu",
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(FileNotFoundError, match="no image in .*night: nothing to score for 2026-11-22"):
        state.result()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(state.state_details.flow_run_id).state.is_failed()
    runs = tables.read_table(out / "tables" / "runs")
    assert list(runs["status"]) == ["no_input"] and list(runs["n_images"]) == [0]
    assert runs["run_id"].iloc[0] == str(state.state_details.flow_run_id)


def test_image_that_breaks_after_cataloguing_is_failed_with_its_reason(
    prefect_api, dask_address, demo_day, tiny_backbone, tmp_path
):
    from prefect import flow

    from flows.score import score_catalog, token_geometry
    from flows.stages import Stages
    from musc_tasks.tasks import catalog_images

    product = tmp_path / "in" / "brick"
    product.mkdir(parents=True)
    for image in [i for i in demo_day.images if i.product == "brick"][:5]:
        shutil.copy(image.path, product / image.path.name)
    victim = sorted(product.iterdir())[2]
    out = tmp_path / "out"

    @flow
    def breaks_between_stages():
        geometry = token_geometry(tiny_backbone)
        stages = Stages()
        catalog = stages.run(
            "catalog",
            catalog_images,
            input_dir=str(tmp_path / "in"),
            out_dir=str(out),
            run_date="2026-11-22",
            min_side=geometry.patch_size,
        )
        assert catalog.n_failed == 0  # readable when catalogued
        victim.write_bytes(victim.read_bytes()[:300])  # truncated before its tokens are extracted
        summary, _ = score_catalog(
            catalog, tiny_backbone, geometry, ScoringParams(), str(out), "cpu", dask_address, stages
        )
        return summary

    summary = breaks_between_stages()
    rows = tables.read_table(out / "tables" / "scores")
    row = rows[rows["path"] == str(victim)].iloc[0]
    assert row["status"] == "failed"
    assert "unreadable at extraction" in row["error"] and "truncat" in row["error"].lower()
    assert summary.n_failed == 1 and summary.n_scored == 4
