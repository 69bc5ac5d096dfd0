"""The morning report of three nights, opened in a real headless Chromium served over HTTP.

Nights 1 and 2 run the flow in this process; night 3 runs the `musc score` command (its own
Dask cluster and a broken file in the input), which also shows what its console prints.
"""

import filecmp
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from datetime import date
from pathlib import Path
from urllib.parse import urljoin, urlparse

import duckdb
import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pytest
from PIL import Image

from flows.score import score_captures
from musc_tasks import tables
from musc_tasks.cli import main
from musc_tasks.config import ScoringParams
from musc_tasks.references import list_reference_sets
from musc_tasks.report import CROPS_SHOWN, TREND_NIGHTS, build_day_report

from .browser import chromium, static_server
from .conftest import subprocess_env
from .processes import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*RANDOM weights")]

NIGHTS = ("2026-11-20", "2026-11-21", "2026-11-22")
BROKEN = "brick/zz-broken.png"
# Set to a path (e.g. docs/report-screenshot.png) to refresh README's screenshot.
DOCS_SCREENSHOT = os.environ.get("MUSC_DOCS_SCREENSHOT")


@pytest.fixture(scope="module")
def nights(prefect_api, dask_address, demo_day, tiny_backbone, tmp_path_factory):
    """OUT after three nights of the demo day; the third with a zero-byte file, run by the CLI."""
    out_dir = tmp_path_factory.mktemp("out")
    for night in NIGHTS[:2]:
        score_captures(
            input_dir=str(demo_day.input_dir),
            out_dir=str(out_dir),
            run_date=night,
            backbone=tiny_backbone,
            scoring=ScoringParams(),
            device="cpu",
            dask_address=dask_address,
        )
    third = tmp_path_factory.mktemp("night3") / "input"
    shutil.copytree(demo_day.input_dir, third)
    (third / BROKEN).write_bytes(b"")
    command = [
        sys.executable,
        "-m",
        "musc_tasks.cli",
        "score",
        str(third),
        "--out",
        str(out_dir),
        "--date",
        NIGHTS[2],
        "--backbone",
        tiny_backbone.name,
        "--model-config",
        str(tiny_backbone.model_config_path),
        "--pretrained",
        "none",
        "--image-size",
        str(tiny_backbone.image_size),
        "--layers",
        ",".join(map(str, tiny_backbone.layers)),
        "--device",
        "cpu",
    ]
    env = {**subprocess_env(prefect_api), "PYTHONPATH": str(REPO), "MUSC_PROGRESS": "0"}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return out_dir, done, third


def scores_sql(out_dir, sql):
    scores = f"read_parquet('{out_dir}/tables/scores/**/*.parquet', hive_partitioning=true)"
    return duckdb.sql(sql.format(scores=scores)).df()


def same_origin_links(driver, base):
    """Every image and link target of the page, asserting that none leaves the served folder."""
    urls = driver.execute_script(
        "return [...document.querySelectorAll('img')].map(e => e.src)"
        ".concat([...document.querySelectorAll('a[href]')].map(e => e.href))"
        ".concat([...document.querySelectorAll('link[href]')].map(e => e.href))"
    )
    for url in urls:
        assert url.startswith(base + "/") or url.startswith("data:"), f"{url} is not inside the report's folder"
    return urls


def fetch(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200, url
        return response.read()


def assert_images_loaded(driver):
    images = driver.execute_script(
        "return [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.alt])"
    )
    assert images
    for src, complete, width, alt in images:
        assert complete and width > 0, f"{src} did not load"
        assert alt.strip(), f"{src} has no alt text"
    return images


def test_cli_run_prints_a_short_console_and_the_report_path(nights, prefect_api):
    out_dir, done, _ = nights
    console = (done.stdout + done.stderr).splitlines()
    # No INFO chatter (Prefect's and Dask's); warnings stay visible by design.
    chatter = [line for line in console if line.startswith("INFO") or line.startswith("distributed")]
    assert not chatter, "\n".join(console)
    report = out_dir / "reports" / NIGHTS[2] / "index.html"
    assert f"  report:   {report}" in done.stdout.splitlines()
    # The listed parts: flagged ones marked "*" and followed by a heatmap path that opens.
    night = duckdb.sql(
        f"select path, score, flagged from read_parquet('{out_dir}/tables/scores/date={NIGHTS[2]}/**/*.parquet') "
        "where status = 'scored' order by score desc, path limit 5"
    ).df()
    lines = done.stdout.splitlines()
    listed = [line for line in lines if re.match(r"  [* ] \d\.\d{4}  ", line)]
    assert [line[4:].split("  ")[2] for line in listed] == list(night["path"])
    assert [line.startswith("  * ") for line in listed] == list(night["flagged"])
    heatmaps = [line.split("heatmap ", 1)[1] for line in lines if line.startswith("      heatmap ")]
    assert len(heatmaps) == night["flagged"].sum()
    assert all(os.path.isabs(path) and Image.open(path).size for path in heatmaps)
    assert report.is_file()
    filter_ = {"artifacts": {"key": {"any_": ["score-summary"]}}}
    artifacts = httpx.post(f"{prefect_api}/artifacts/filter", json=filter_).raise_for_status().json()
    assert any(f"]({report.as_uri()})" in artifact["data"] for artifact in artifacts)
    # Each stage's progress artifact was paced (ArtifactPace), and each still ended at 100 %.
    runs = list(tables.read_table(out_dir / "tables" / "runs")["flow_run_id"].dropna())
    filter_ = {"artifacts": {"type": {"any_": ["progress"]}, "flow_run_id": {"any_": runs}}}
    progress = httpx.post(f"{prefect_api}/artifacts/filter", json=filter_).raise_for_status().json()
    assert progress and {artifact["data"] for artifact in progress} == {100.0}, progress


def test_report_in_a_real_browser(nights, tmp_path):
    out_dir, *_ = nights
    night = NIGHTS[2]
    table = scores_sql(out_dir, f"select * from {{scores}} where date = '{night}' order by product, rank, path")
    trend = scores_sql(
        out_dir,
        "select product, date::varchar date, count(*) n, sum(flagged::int)::int flagged, median(score) median "
        "from {scores} where status = 'scored' group by all order by product, date",
    )
    with static_server(out_dir) as base, chromium(1280, 900) as driver:
        driver.get(f"{base}/reports/{night}/index.html")
        assert driver.title == f"MuSc report {night}"
        assert driver.execute_script("return document.scripts.length") == 0  # the gallery needs no JS
        images = assert_images_loaded(driver)
        assert sum(1 for src, *_ in images if src.endswith(".svg")) == 2 * table["product"].nunique()  # charts
        assert sum(1 for src, *_ in images if src.endswith("/legend.png")) == table["product"].nunique()

        sections = driver.execute_script(
            "return [...document.querySelectorAll('section.product')].map(s => [s.dataset.product,"
            " [...s.querySelectorAll('.gallery > li')].map(li => [Number(li.dataset.rank),"
            " li.classList.contains('flagged'), li.querySelector('.path code').textContent]),"
            " [...s.querySelectorAll('table.problems tbody tr')].map(tr => tr.innerText),"
            " [...s.querySelectorAll('table.trend tbody tr')]"
            ".map(tr => tr.cells[0].textContent + ' ' + tr.cells[2].textContent)])"
        )
        assert [s[0] for s in sections] == sorted(table["product"].unique())
        for product, parts, problems, trend_rows in sections:
            rows = table[(table["product"] == product) & (table["status"] == "scored")]
            flagged = rows[rows["flagged"].astype(bool)]
            shown = [(rank, is_flagged, path) for rank, is_flagged, path in parts]
            assert [rank for rank, *_ in shown] == sorted(rank for rank, *_ in shown), f"{product}: not in rank order"
            assert shown[0][0] == 1
            # every flagged part, each with its table rank, in the table's order
            assert [(r.rank, r.path) for r in flagged.itertuples()] == [(rank, path) for rank, f, path in shown if f]
            failed = table[(table["product"] == product) & (table["status"] != "scored")]
            assert len(problems) == len(failed)
            for row, text in zip(failed.itertuples(), problems):
                assert row.path in text and row.error in text
            nightly = trend[trend["product"] == product].tail(TREND_NIGHTS)
            assert trend_rows == [f"{r.date} {r.flagged}" for r in nightly.itertuples()]
            assert len(trend_rows) == len(NIGHTS)
        assert any(BROKEN.split("/")[1] in text for s in sections for text in s[2])

        hrefs = [u for u in same_origin_links(driver, base) if u.startswith(base)]
        full_res = driver.execute_script("return [...document.querySelectorAll('a.full-res')].map(a => a.href)")
        assert len(full_res) >= 2 * sum(len(s[1]) for s in sections)
        for url in set(hrefs):
            body = fetch(url)
            if url in full_res:
                local = out_dir / urllib.request.url2pathname(urlparse(url).path).lstrip("/")
                assert body == local.read_bytes(), url
        heatmaps = {url for url in full_res if "/heatmaps/" in url}
        in_out = [os.path.relpath(p, out_dir) for p in table["heatmap_path"].dropna()]
        assert {urljoin(base + "/", urllib.request.pathname2url(p)) for p in in_out} >= heatmaps

        # a flagged part's card shows its strongest regions' crops, each opening the crop file
        regions = tables.read_table(out_dir / "tables" / "regions", filters=[("date", "=", night)])
        cards = driver.execute_script(
            "return [...document.querySelectorAll('.gallery > li')].map(li => [li.querySelector('.path code')"
            ".textContent, [...li.querySelectorAll('.crops a')].map(a => a.href)])"
        )
        shown = 0
        for path, links in cards:
            mine = regions[regions["path"] == path].sort_values("region").head(CROPS_SHOWN)
            crop_files = [os.path.relpath(p, out_dir) for p in mine["crop_path"]]
            assert links == [urljoin(base + "/", urllib.request.pathname2url(p)) for p in crop_files], path
            shown += len(links)
        assert shown >= table["flagged"].fillna(False).astype(bool).sum() > 0

        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
        screenshot = tmp_path / "report.png"
        assert driver.save_screenshot(str(screenshot))
        print(f"\nreport screenshot: {screenshot}")
        if DOCS_SCREENSHOT:
            driver.set_window_size(1280, 1500)
            driver.execute_script("window.scrollTo(0, 0)")
            docs = REPO / DOCS_SCREENSHOT
            driver.save_screenshot(str(docs))
            with Image.open(docs) as full:
                small = full.convert("RGB").resize((960, 1125), Image.Resampling.LANCZOS)
            small.quantize(colors=128).save(docs, optimize=True)
            print(f"docs screenshot: {docs} ({docs.stat().st_size // 1024} KB)")
    with Image.open(screenshot) as shot:
        assert shot.size[0] > 0


def test_days_index_lists_the_three_nights(nights):
    out_dir, *_ = nights
    counts = scores_sql(
        out_dir,
        "select date::varchar date, count(*) images, sum(coalesce(flagged, false)::int)::int flagged, "
        "sum((status = 'failed')::int)::int failed from {scores} group by date order by date desc",
    )
    with static_server(out_dir) as base, chromium() as driver:
        driver.get(f"{base}/reports/index.html")
        rows = driver.execute_script(
            "return [...document.querySelectorAll('tr.day')].map(tr => [tr.dataset.date,"
            " [...tr.cells].map(c => c.textContent.trim()), tr.querySelector('a').href])"
        )
        assert [r[0] for r in rows] == list(reversed(NIGHTS))
        for (day, cells, href), expected in zip(rows, counts.itertuples()):
            assert day == expected.date
            assert cells[2:5] == [str(expected.images), str(expected.flagged), str(expected.failed)]
            assert href == f"{base}/reports/{day}/index.html"
            assert b"MuSc morning report" in fetch(href)
        same_origin_links(driver, base)
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_musc_report_rebuilds_a_past_night(nights, prefect_api, tmp_path):
    """Removed entirely, the first night's report comes back byte for byte from OUT alone."""
    out_dir, *_ = nights
    day_dir = out_dir / "reports" / NIGHTS[0]
    kept = tmp_path / "kept"
    shutil.copytree(day_dir, kept)
    shutil.rmtree(day_dir)
    (out_dir / "reports" / "index.html").unlink()
    command = [sys.executable, "-m", "musc_tasks.cli", "report", "--date", NIGHTS[0], "--out", str(out_dir)]
    env = {**subprocess_env(prefect_api), "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == str(day_dir / "index.html")
    files = sorted(p.relative_to(kept) for p in kept.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(day_dir) for p in day_dir.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(kept, day_dir, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    index = (out_dir / "reports" / "index.html").read_text()
    assert all(f'data-date="{night}"' in index for night in NIGHTS)


def test_report_rebuilds_from_out_alone_when_the_captures_are_gone(nights, tmp_path):
    """Without its input folder a night's page still builds: heatmaps boxed, captures marked missing."""
    out_dir, _, third = nights
    copy = tmp_path / "out"
    shutil.copytree(out_dir, copy, ignore=shutil.ignore_patterns("cache"))
    shutil.rmtree(copy / "reports" / NIGHTS[2])
    moved = third.with_name("moved-away")
    third.rename(moved)
    try:
        report = build_day_report(copy, NIGHTS[2])
    finally:
        moved.rename(third)
    assert report.path == copy / "reports" / NIGHTS[2] / "index.html"
    with static_server(copy) as base, chromium() as driver:
        driver.get(f"{base}/reports/{NIGHTS[2]}/index.html")
        images = assert_images_loaded(driver)
        parts = driver.execute_script("return document.querySelectorAll('.gallery > li').length")
        missing = driver.execute_script("return document.querySelectorAll('.gallery .missing').length")
        assert parts > 0 and missing == parts
        assert not [src for src, *_ in images if src.endswith("-capture.jpg")]
        assert sum(1 for src, *_ in images if src.endswith("-overlay.jpg")) == parts
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_analysts_queries_range_over_dates_and_give_paths_that_open(nights, capsys):
    """README's pandas and DuckDB forms on three real nights: dates are dates, every path opens."""
    out_dir, *_ = nights
    hive = pds.partitioning(pa.schema([("date", pa.date32()), ("product", pa.string())]), flavor="hive")
    scores = pd.read_parquet(out_dir / "tables" / "scores", partitioning=hive)
    per_night = scores.groupby("date").size()
    assert list(per_night.index) == [date.fromisoformat(night) for night in NIGHTS]
    later = scores[scores["date"] >= date.fromisoformat(NIGHTS[1])]
    assert len(later) == per_night.iloc[1:].sum()
    ours = tables.read_table(out_dir / "tables" / "scores")
    assert len(ours[ours["date"].between(NIGHTS[1], NIGHTS[2])]) == len(later)

    source = f"read_parquet('{out_dir}/tables/scores/**/*.parquet', hive_partitioning = true, "
    source += "hive_types = {'date': DATE, 'product': VARCHAR})"
    in_range = f"SELECT count(*) FROM {source} WHERE date BETWEEN DATE '{NIGHTS[1]}' AND DATE '{NIGHTS[2]}'"
    assert duckdb.sql(in_range).fetchall() == [(len(later),)]
    assert main(["query", f"SELECT count(*) n FROM scores WHERE date >= '{NIGHTS[1]}'", "--out", str(out_dir)]) == 0
    assert capsys.readouterr().out.splitlines()[1].strip() == str(len(later))

    top = duckdb.sql(f"SELECT path, mask_path, heatmap_path FROM {source} WHERE status = 'scored' AND rank <= 5")
    opened = [column for row in top.fetchall() for column in row]
    assert opened and all(Path(p).is_file() for p in opened)
    regions = tables.read_table(out_dir / "tables" / "regions")
    runs = tables.read_table(out_dir / "tables" / "runs")
    assert all(Path(p).is_file() for p in regions["path"]) and all(Path(p).is_dir() for p in runs["input_dir"])


def test_curate_picks_references_from_the_three_nights(nights, tiny_backbone, capsys):
    """`musc references curate` on the nights' own tables and token stores: a versioned set, no extraction."""
    out_dir = nights[0]
    backbone = ["--backbone", tiny_backbone.name, "--model-config", str(tiny_backbone.model_config_path)]
    backbone += ["--pretrained", "none", "--image-size", str(tiny_backbone.image_size), "--layers", "1,3"]
    curate = ["references", "curate", "--product", "brick", "--out", str(out_dir), *backbone]
    capsys.readouterr()
    assert main([*curate, "--from", NIGHTS[0], "--to", NIGHTS[2], "--max", "4"]) == 0
    assert main(["references", "list", "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "brick\tcurated@v1:" in printed and "4 images" in printed and "added by curate" in printed
    (stored,) = list_reference_sets(out_dir, product="brick")
    scores = tables.read_table(out_dir / "tables" / "scores", filters=[("product", "=", "brick")])
    scored = scores[scores["status"] == "scored"]
    per_night = scored.groupby("date").size()
    for entry in stored.entries:  # the same images every night: each picked once, never flagged, bottom half
        rows = scored[scored["image_id"] == entry.image_id]
        assert len(rows) == 3 and not rows["flagged"].any()
        assert (rows["rank"] > rows["date"].map(per_night) / 2).all()
        assert entry.from_date in NIGHTS and entry.from_score in set(rows["score"])
    assert len({e.image_id for e in stored.entries}) == 4

    assert main([*curate, "--from", NIGHTS[0], "--to", NIGHTS[2], "--max", "4"]) == 0  # same pick, same version
    assert "curated@v1:" in capsys.readouterr().out
    assert main([*curate, "--from", "2026-12-01", "--to", "2026-12-31"]) == 2
    assert "no night of 'brick' scored with backbone" in capsys.readouterr().err
