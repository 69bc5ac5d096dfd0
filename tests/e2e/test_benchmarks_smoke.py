"""The benchmark scripts still run (tiny shapes, no timing asserted): README's commands stay true."""

import json
import subprocess
import sys

import pytest

from .processes import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore")]

BENCHMARKS = REPO / "benchmarks"


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], cwd=REPO, capture_output=True, text=True, timeout=500
    )
    assert done.returncode == 0, (
        f"{script} {' '.join(args)} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_msm_benchmark():
    out = run("msm.py", "--n", "6", "--length", "16", "--channels", "32")
    assert "max |difference|" in out, out


def test_stage_benchmark(tmp_path):
    out = run("run.py", "--smoke", "--json", str(tmp_path / "stages.json"))
    assert "| shape | N | block | MSM s |" in out, out
    assert (tmp_path / "stages.json").stat().st_size > 0


def test_dask_scale_benchmark(tmp_path):
    out = run(
        "dask_scale.py",
        "--n",
        "6",
        "--length",
        "16",
        "--channels",
        "32",
        "--workers",
        "2",
        "--json",
        str(tmp_path / "dask.json"),
    )
    assert "| workers (1 thread each) |" in out, out


def test_msm_stage_benchmark():
    out = run("msm_stage.py", "--n", "6", "--length", "16", "--channels", "8", "--repeats", "1", "--workers", "1")
    assert "| stage on Dask |" in out, out


def test_day_scale_benchmark(prefect_api, tmp_path):
    # the session's Prefect server: the README command's ephemeral server per run is covered by test_offline
    out = run("day_scale.py", "--smoke", "--prefect-api", prefect_api, "--json", str(tmp_path / "day.json"))
    assert "time per image" in out, out


def test_cli_errors_benchmark():
    out = run("cli_errors.py", "--repeats", "1")
    assert out.count("exit 2") == 9 and out.count("musc: error: ") == 9, out


def test_report_benchmark(tmp_path):
    out = run("report.py", "--smoke", "--json", str(tmp_path / "report.json"))
    assert "| images x products | nights |" in out, out


def test_factory_night_5mp_captures_end_to_end(prefect_api, tmp_path):
    """A few 5-MP camera captures through `musc score`: every one scored, full-size masks, heatmaps."""
    options = ["--images", "4", "--resolution", "2448x2048", "--check", "--prefect-api", prefect_api]
    out = run("factory_night.py", *options, "--json", str(tmp_path / "f.json"))
    assert "| all outputs |" in out, out


def test_extraction_benchmark(tmp_path):
    out = run("extraction.py", "--images", "4", "--resolution", "320x240", "--image-size", "112", "--repeats", "1")
    assert "overlapped_over_forward" in out, out


def test_worker_sampling_benchmark():
    out = run("worker_sampling.py", "--images-per-product", "3", "--rounds", "1")
    assert "round 1, Dask's defaults" in out and "round 1, the run's" in out, out


def test_publish_regions_benchmark():
    out = run("publish_regions.py", "--images", "2", "--resolution", "1200x500", "--repeats", "1")
    assert "publish cells / whole mask:" in out, out


def test_publish_night_benchmark():
    # 12 images: the top 10 drawn at full size, 2 bounded (long side 2048 -> 1024, decoded at 1/2)
    out = run("publish_night.py", "--images", "12", "--captures", "2", "--resolution", "2048x256", "--repeats", "1")
    assert "| this | median |" in out and "PSNR dB over 2 captures" in out, out
    assert "written crops" in out, out  # image 0 is flagged: its regions' crops are counted


def test_bad_night_signals_benchmark():
    out = run("bad_night_signals.py", "--seeds", "0", "--repeated", "5")
    rows = {}  # the first table: the flag's signals (the second has the same night names)
    for line in out.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0], line)
    assert rows["| bad (5 of 12 repeated)"].endswith("| 1 of 1 |"), out  # the flag fires (README: seed 0)
    assert rows["| ordinary (3 of 12, each its own)"].endswith("| 0 of 1 |"), out
    assert "combined max" in out, out


def test_whole_run_benchmark_against_a_running_server_and_cluster(tmp_path):
    # the runs' scores are checked against the in-memory engine's (the script exits 1 when they differ)
    options = ["--site", "--products", "1", "--images-per-product", "6", "--json", str(tmp_path / "run.json")]
    out = run("whole_run.py", *options)
    assert "against a running Prefect server and a 2-worker Dask cluster (--site)" in out, out
    assert "pipeline / engine as a script (with its imports):" in out, out
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["site"] and report["max_abs_diff_score"] <= 1e-5 and len(report["pipeline_runs"]) == 1
