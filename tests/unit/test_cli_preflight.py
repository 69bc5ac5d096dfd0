"""Bad options and inputs: one line naming the option or file, exit status 2, nothing heavy started."""

import subprocess
import sys
from pathlib import Path

import pytest

from musc_tasks.cli import main

from ..conftest import TINY_CONFIG

TINY = ["--backbone", "musc-tiny-vit", "--model-config", str(TINY_CONFIG), "--pretrained", "none"]


@pytest.fixture
def day(tmp_path):
    (tmp_path / "day" / "bolt").mkdir(parents=True)
    (tmp_path / "day" / "bolt" / "000.png").write_bytes(b"not decoded by the preflight")
    return tmp_path / "day"


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("musc: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_score_errors_name_the_option_or_file(day, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "does-not-exist does not exist" in _error(capsys, ["score", str(tmp_path / "does-not-exist"), "--out", out])
    assert "--date '22-11-2026' is not a date: give it as YYYY-MM-DD" in _error(
        capsys, ["score", str(day), "--out", out, "--date", "22-11-2026"]
    )
    assert "--pool-size 1: a pool needs at least 2 images" in _error(
        capsys, ["score", str(day), "--out", out, "--pool-size", "1"]
    )
    # the preset's ViT-B-16-plus-240 has 16 px patches
    assert "--image-size 225 is not a multiple of ViT-B-16-plus-240's patch size 16: use e.g. 224 or 240" in _error(
        capsys, ["score", str(day), "--out", out, "--preset", "fast", "--image-size", "225"]
    )
    assert "--pretrained /no/such.pth: checkpoint file does not exist" in _error(
        capsys, ["score", str(day), "--out", out, "--pretrained", "/no/such.pth"]
    )
    empty = tmp_path / "empty" / "bolt"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no image here")
    assert "holds no image" in _error(capsys, ["score", str(empty.parent), "--out", out])
    dated = str(tmp_path / "{date}")
    assert "2026-11-22 does not exist" in _error(capsys, ["score", dated, "--out", out, "--date", "2026-11-22"])


def test_timm_and_dino_patch_sizes_from_names(day, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert "dinov2_vits14's patch size 14" in _error(
        capsys, ["score", str(day), "--out", out, "--backbone", "dinov2_vits14", "--image-size", "225"]
    )
    message = _error(capsys, ["score", str(day), "--out", out, *TINY, "--image-size", "200"])
    assert "--image-size 200 is not a multiple of musc-tiny-vit's patch size 14" in message


def test_unknown_backbone_names_and_missing_checkpoints(day, tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    message = _error(capsys, ["score", str(day), *out, "--backbone", "ViT-L-14-335"])
    assert "--backbone 'ViT-L-14-335' is unknown (did you mean ViT-L-14-336?)" in message
    assert "did you mean dinov2_vitl14?" in _error(capsys, ["score", str(day), *out, "--backbone", "dinov2_vitl16"])
    dates = ["--from", "2026-12-01", "--to", "2026-12-02", "--input-root", str(tmp_path / "{date}")]
    assert "timm:<model>" in _error(capsys, ["backfill", *dates, *out, "--backbone", "timm:"])
    message = _error(capsys, ["score", str(day), *out, "--backbone", "musc-tiny-vit"])
    assert "add --model-config " in message and message.endswith("musc-tiny-vit.json (it registers this model)\n")
    message = _error(capsys, ["fetch-weights", "--backbone", "dinov2_vits14", "--pretrained", "/no/such.pth"])
    assert "--pretrained /no/such.pth: checkpoint file does not exist" in message


def test_backfill_compare_and_evaluate_errors(day, tmp_path, capsys):
    out = str(tmp_path / "out")
    common = ["--input-root", str(tmp_path / "{date}"), "--out", out]
    assert "--from '2026-13-01' is not a date" in _error(
        capsys, ["backfill", "--from", "2026-13-01", "--to", "2026-12-02", *common]
    )
    assert "--from 2026-12-03 is after --to 2026-12-02" in _error(
        capsys, ["backfill", "--from", "2026-12-03", "--to", "2026-12-02", *common]
    )
    assert "has no {date}" in _error(
        capsys, ["backfill", "--from", "2026-12-01", "--to", "2026-12-02", "--input-root", str(day), "--out", out]
    )
    assert "holds no scores table (tables/scores)" in _error(
        capsys, ["compare", "--out", out, "--date", "2026-12-01", "--backbones", "a,b"]
    )
    # an MVTec-shaped root read as VisA finds nothing: an error, not an empty metrics table
    (tmp_path / "mvtec" / "bottle" / "test" / "good").mkdir(parents=True)
    message = _error(capsys, ["evaluate", str(tmp_path / "mvtec"), "--layout", "visa", "--out", out])
    assert "holds no visa category" in message and "is --layout right?" in message
    message = _error(
        capsys, ["evaluate", str(tmp_path / "mvtec"), "--layout", "mvtec", "--out", out, "--categories", "x"]
    )
    assert "--categories x not under" in message


def test_errors_start_no_heavy_library(tmp_path):
    """The validation path imports neither torch, Prefect nor Dask (they cost seconds to import)."""
    script = (
        "import sys; from musc_tasks.cli import main; "
        f"rc = main(['score', {str(tmp_path / 'missing')!r}, '--out', 'x', '--image-size', '225']); "
        "rc += main(['fetch-weights', '--backbone', 'ViT-L-14-335']); "
        "heavy = sorted({'torch', 'prefect', 'dask', 'distributed', 'open_clip', 'timm'} & set(sys.modules)); "
        "print(rc, heavy)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.stdout.strip() == "4 []", done.stdout + done.stderr


def test_a_clip_backbone_by_name_is_resolved_without_torch(tmp_path):
    """``--backbone`` of a CLIP ViT: its geometry from the JSON configs, so the command's start imports no torch."""
    (tmp_path / "night" / "part").mkdir(parents=True)
    tiny = Path(__file__).parents[2] / "musc_tasks" / "model_configs" / "musc-tiny-vit.json"
    script = (
        "import sys; from musc_tasks.cli import build_parser, validate_scoring; "
        f"night = {str(tmp_path / 'night')!r}; "
        "parse = build_parser().parse_args; "
        "named = validate_scoring(parse(['score', night, '--out', 'x', '--backbone', 'ViT-B-16'])); "
        f"tiny = validate_scoring(parse(['score', night, '--out', 'x', '--backbone', 'musc-tiny-vit', "
        f"'--model-config', {str(tiny)!r}])); "
        "heavy = sorted({'torch', 'prefect', 'dask', 'distributed', 'open_clip', 'timm'} & set(sys.modules)); "
        "print(named.image_size, list(named.layers), named.pretrained, tiny.image_size, list(tiny.layers), heavy)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.stdout.strip() == "224 [2, 5, 8, 11] None 224 [0, 1, 2, 3] []", done.stdout + done.stderr


def test_evaluate_shots_errors(tmp_path, capsys):
    """--references --shots K: K train images per category, checked before anything heavy."""
    root, out = tmp_path / "mvtec", str(tmp_path / "out")
    for category in ("bottle", "screw"):
        (root / category / "test" / "good").mkdir(parents=True)
        (root / category / "test" / "good" / "000.png").write_bytes(b"x")
    for name in ("000.png", "001.png", "002.png"):
        (root / "bottle" / "train" / "good").mkdir(parents=True, exist_ok=True)
        (root / "bottle" / "train" / "good" / name).write_bytes(b"x")
    evaluate = ["evaluate", str(root), "--layout", "mvtec", "--out", out]
    bottle = [*evaluate, "--categories", "bottle"]
    assert "--shots 0: give at least 1 reference image per category" in _error(
        capsys, [*bottle, "--references", "--shots", "0"]
    )
    assert "--shots 4: category 'bottle' has only 3 train image(s)" in _error(
        capsys, [*bottle, "--references", "--shots", "4"]
    )
    assert "--references: no train folder" in _error(capsys, [*evaluate, "--references", "--shots", "2"])
    assert "screw/train/good" in _error(capsys, [*evaluate, "--references", "--shots", "2"])
    assert "--references needs --shots K" in _error(capsys, [*bottle, "--references"])
    assert "--shots 2 needs --references" in _error(capsys, [*bottle, "--shots", "2"])
    assert "combined needs at least 2 references" in _error(capsys, [*bottle, "--references", "--shots", "1"])
    script = (
        "import sys; from musc_tasks.cli import main; "
        f"rc = main({[*bottle, '--references', '--shots', '4']!r}); "
        "heavy = sorted({'torch', 'prefect', 'dask', 'distributed', 'open_clip', 'timm'} & set(sys.modules)); "
        "print(rc, heavy)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr


def test_reference_modes_are_the_cores():
    """The flows' ReferenceMode (the deployments' choice list) and the CLI's choices are the core's modes."""
    from typing import get_args

    from musc_tasks.cli import build_parser
    from musc_tasks.config import ReferenceMode
    from musc_tasks.core import REFERENCE_MODES

    assert get_args(ReferenceMode) == REFERENCE_MODES
    for command in (["score", "x", "--out", "o"], ["evaluate", "x", "--layout", "mvtec", "--out", "o"]):
        parsed = build_parser().parse_args([*command, "--reference-mode", "plus"])
        assert parsed.reference_mode == "plus"
