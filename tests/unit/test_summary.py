"""The console summary at the end of `musc score` and `musc demo`: flagged parts marked, heatmaps given."""

from musc_tasks.cli import print_summary
from musc_tasks.manifests import RunSummary, TopPart


def summary(top, n_flagged):
    return RunSummary(
        run_id="r",
        run_date="2026-11-22",
        out_dir="/out",
        backbone_key="k",
        n_images=9,
        n_scored=9,
        n_flagged=n_flagged,
        n_failed=0,
        seconds={"catalog": 1.0},
        images_extracted=9,
        images_token_cached=0,
        pairs_computed=1,
        pairs_cached=0,
        top=tuple(top),
    )


def part(name, score, flagged, margin):
    heatmap = f"/out/heatmaps/2026-11-22/brick/k/{name}.jpg"
    return TopPart(
        product="brick", path=f"/in/brick/{name}.png", score=score, flagged=flagged, margin=margin, heatmap_path=heatmap
    )


def test_flagged_parts_are_marked_with_their_heatmap(capsys):
    top = [part(f"{i:03d}", 1.0 - i / 10, i in (0, 1, 6), 2.0 - i) for i in range(7)]
    print_summary(summary(top, n_flagged=4))
    lines = capsys.readouterr().out.splitlines()
    listed = [line for line in lines if "/in/brick/" in line]
    assert len(listed) == 5  # a person reads it: the top five
    assert listed[0] == "  * 1.0000  brick  /in/brick/000.png  margin +2.0"
    assert listed[2] == "    0.8000  brick  /in/brick/002.png  margin +0.0"
    heatmaps = [line.strip() for line in lines if line.strip().startswith("heatmap ")]
    assert heatmaps == [f"heatmap /out/heatmaps/2026-11-22/brick/k/{n}.jpg" for n in ("000", "001")]
    assert lines[lines.index(listed[1]) + 1].strip() == heatmaps[1]
    assert "    2 more flagged: see the report or tables/scores (flagged = true)" in lines


def test_no_margin_when_the_scores_have_no_spread(capsys):
    print_summary(summary([part("000", 0.5, False, None)], n_flagged=0))
    out = capsys.readouterr().out
    assert "    0.5000  brick  /in/brick/000.png\n" in out and "more flagged" not in out
