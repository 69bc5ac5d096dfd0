"""The curation rule on a hand-made history: bottom half, never flagged, content-unique, spread over nights."""

import pandas as pd
import pytest

from musc_tasks.references import choose_references


def night(day: str, images: list[tuple[str, float, bool]]) -> list[dict]:
    """Score rows of one night, ranked in the given order (rank 1 the most anomalous)."""
    return [
        {"date": day, "image_id": i, "path": f"{day}/{i}.png", "score": s, "rank": r, "flagged": f, "status": "scored"}
        for r, (i, s, f) in enumerate(images, start=1)
    ]


@pytest.fixture
def history():
    rows = night(
        "2026-11-01",
        [("x1", 0.9, True), ("x2", 0.8, False), ("x3", 0.7, False), ("a1", 0.3, False), ("a2", 0.2, True)]
        + [("a3", 0.1, False)],
    )
    rows += night("2026-11-02", [("y1", 0.9, False), ("a3", 0.7, False), ("b2", 0.2, False), ("b1", 0.2, False)])
    rows += night(
        "2026-11-03",
        [("z1", 0.9, False), ("z2", 0.8, False), ("z3", 0.7, False), ("c1", 0.3, False), ("c2", 0.2, False)]
        + [("a1", 0.1, False)],
    )
    rows.append(
        {"date": "2026-11-03", "image_id": "f1", "path": "f1.png", "score": None, "rank": None, "flagged": None}
        | {"status": "failed"}
    )
    return pd.DataFrame(rows)


def test_picks_bottom_half_never_flagged_once_each_round_robin(history):
    picked = choose_references(history, max_size=10)
    # a2 flagged; a3 in the top half on 11-02; a1 twice, credited to 11-03 where it ranked most normal;
    # b1/b2 tie on score and go by id; 11-01 has nothing left, so 11-02 and 11-03 alternate
    assert picked["image_id"].tolist() == ["b1", "a1", "b2", "c2", "c1"]
    first = picked.iloc[1]
    assert (first["date"], first["score"], first["path"]) == ("2026-11-03", 0.1, "2026-11-03/a1.png")


def test_the_cap_takes_from_every_night_before_a_second_from_any(history):
    assert choose_references(history, max_size=3)["image_id"].tolist() == ["b1", "a1", "b2"]
    big = night("2026-11-04", [(f"n{i:02d}", 1.0 - i / 20, False) for i in range(20)])
    picked = choose_references(pd.concat([history, pd.DataFrame(big)]), max_size=6)
    assert picked.groupby("date").size().to_dict() == {"2026-11-02": 2, "2026-11-03": 2, "2026-11-04": 2}


def test_nothing_qualifies_gives_an_empty_pick(history):
    flagged = history.assign(flagged=True)
    picked = choose_references(flagged)
    assert picked.empty and list(picked.columns) == ["image_id", "path", "date", "score"]
