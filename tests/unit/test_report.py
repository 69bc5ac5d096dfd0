"""The report's pure parts against plain recomputations."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from musc_tasks.render import BOX_RGB
from musc_tasks.report import (
    draw_boxes,
    gallery_rows,
    histogram_svg,
    nightly_trend,
    out_relative,
    thumbnail,
    trend_svg,
)


def night_rows(rng, day, n, flagged_share=0.2):
    score = rng.random(n)
    return pd.DataFrame(
        {
            "date": day,
            "path": [f"/in/{day}/{i:03d}.png" for i in range(n)],
            "score": score,
            "flagged": score > 1 - flagged_share,
            "rank": pd.Series(score).rank(ascending=False, method="first").astype(int),
            "status": "scored",
        }
    )


def test_nightly_trend_keeps_the_last_nights_up_to_the_report():
    rng = np.random.default_rng(0)
    days = [f"2026-10-{d:02d}" for d in range(1, 32)] + ["2026-11-01", "2026-11-02"]
    frames = [night_rows(rng, day, int(rng.integers(3, 12))) for day in days]
    frames.append(
        pd.DataFrame(
            {
                "date": ["2026-10-05"],
                "path": ["/bad"],
                "score": [np.nan],
                "flagged": [None],
                "rank": [None],
                "status": ["failed"],
            }
        )
    )
    scores = pd.concat(frames, ignore_index=True)
    trend = nightly_trend(scores, "2026-11-01", nights=30)
    assert list(trend["date"]) == days[2:32]  # 30 nights ending at the report's, 11-02 excluded
    for row in trend.itertuples():
        night = scores[(scores["date"] == row.date) & (scores["status"] == "scored")]
        assert row.images == len(night)
        assert row.flagged == int(night["flagged"].astype(bool).sum())
        assert row.flag_rate == pytest.approx(night["flagged"].astype(bool).mean())
        assert row.median_score == pytest.approx(float(np.median(night["score"])))


def test_nightly_trend_of_no_scored_night_is_empty():
    scores = pd.DataFrame({"date": ["2026-11-01"], "score": [np.nan], "flagged": [None], "status": ["failed"]})
    assert nightly_trend(scores, "2026-11-01").empty


def test_gallery_shows_every_flagged_part_and_the_top_ranked_in_rank_order():
    rng = np.random.default_rng(1)
    night = night_rows(rng, "2026-11-01", 40, flagged_share=0.3)
    chosen = gallery_rows(night, top=5, limit=100)
    expected = night[night["flagged"] | (night["rank"] <= 5)].sort_values("rank")
    assert list(chosen["path"]) == list(expected["path"])
    assert list(gallery_rows(night, top=5, limit=3)["rank"]) == [1, 2, 3]


def test_thumbnail_shrinks_to_the_longer_side_and_never_enlarges():
    pixels = np.random.default_rng(2).integers(0, 256, (300, 900, 3), dtype=np.uint8)
    assert thumbnail(Image.fromarray(pixels), side=320).shape == (107, 320, 3)
    small = pixels[:100, :150]
    assert np.array_equal(thumbnail(Image.fromarray(small), side=320), small)


def test_boxes_are_drawn_at_the_scaled_region_edges():
    pixels = np.full((50, 50, 3), 128, np.uint8)
    drawn = draw_boxes(pixels, [(20, 20, 60, 40)], scale=0.5)  # original 100 px -> 50 px: x 10..29, y 10..19
    box, black, grey = BOX_RGB, (0, 0, 0), (128, 128, 128)
    # 2 px of the heatmaps' box colour just outside the region, 1 px black outside that, the region untouched
    assert [tuple(drawn[15, x]) for x in (6, 7, 8, 9, 10, 29, 30, 31, 32, 33)] == [
        grey,
        black,
        box,
        box,
        grey,
        grey,
        box,
        box,
        black,
        grey,
    ]
    assert [tuple(drawn[y, 20]) for y in (7, 8, 9, 10, 19, 20, 21, 22)] == [
        black,
        box,
        box,
        grey,
        grey,
        box,
        box,
        black,
    ]


def test_charts_are_deterministic_svg_with_the_threshold():
    scores = np.random.default_rng(3).random(25)
    first = histogram_svg(scores, 0.8, "bottle")
    assert first == histogram_svg(scores, 0.8, "bottle")
    assert (
        first.startswith(b"<?xml")
        and b"threshold 0.8" in first
        and b"http://"
        not in first.replace(b"http://www.w3.org", b"")
        .replace(b"http://purl.org", b"")
        .replace(b"http://creativecommons.org", b"")
    )
    trend = pd.DataFrame(
        {
            "date": ["2026-11-01", "2026-11-02"],
            "images": [4, 5],
            "flagged": [1, 0],
            "flag_rate": [0.25, 0.0],
            "median_score": [0.3, 0.2],
        }
    )
    assert trend_svg(trend, "bottle") == trend_svg(trend, "bottle")


def test_out_relative_finds_the_file_in_this_out_even_when_out_moved(tmp_path):
    stored = f"{tmp_path}/out/heatmaps/2026-11-22/bolt/key/a b.jpg"
    assert out_relative(stored, tmp_path / "out", "heatmaps", "2026-11-22") == "heatmaps/2026-11-22/bolt/key/a b.jpg"
    moved = tmp_path / "copy"  # the same tables read in a copy of OUT: its own files, by the layout
    assert out_relative(stored, moved, "heatmaps", "2026-11-22") == "heatmaps/2026-11-22/bolt/key/a b.jpg"
    assert out_relative("masks/2026-11-22/bolt/key/a.png", moved, "masks", "2026-11-22").startswith("masks/")
    with pytest.raises(ValueError, match="not a masks file of 2026-11-22"):
        out_relative("/elsewhere/a.png", moved, "masks", "2026-11-22")
