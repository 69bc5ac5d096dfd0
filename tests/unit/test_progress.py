"""The CLI's progress: a bar on a terminal, a short line per quarter of the work in a log file."""

import re

import pytest

from musc_tasks.progress import progress_bar


def feed(updates, monkeypatch, capsys, progress="1"):
    monkeypatch.setenv("MUSC_PROGRESS", progress)
    with progress_bar("extract-brick", "tokens brick") as on_progress:
        for done, total in updates:
            on_progress(done, total)
    return capsys.readouterr().err  # not a terminal under pytest's capture


def test_a_log_file_gets_a_line_per_quarter(monkeypatch, capsys):
    err = feed([(done, 12) for done in range(13)], monkeypatch, capsys)
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert [re.sub(r"after [0-9.]+ s", "after T s", line) for line in lines] == [
        "tokens brick: 3/12 (25 %) after T s",
        "tokens brick: 6/12 (50 %) after T s",
        "tokens brick: 9/12 (75 %) after T s",
        "tokens brick: 12/12 (100 %) after T s",
    ]


@pytest.mark.parametrize(
    "updates, expected",
    [
        (
            [(0, 3), (1, 3), (2, 3), (3, 3)],
            ["1/3 (33 %)", "2/3 (67 %)", "3/3 (100 %)"],
        ),  # a quarter skipped is not repeated
        ([(0, 42), (42, 42)], ["42/42 (100 %)"]),
        ([(5, 10), (5, 10), (10, 10), (10, 10)], ["5/10 (50 %)", "10/10 (100 %)"]),  # repeated updates log once
        ([(0, 0)], []),  # nothing to do (all cached): no line
    ],
)
def test_each_quarter_is_logged_once_as_it_is_passed(updates, expected, monkeypatch, capsys):
    err = feed(updates, monkeypatch, capsys)
    assert [line.split(": ", 1)[1].rsplit(" after", 1)[0] for line in err.splitlines()] == expected


def test_nothing_without_musc_progress(monkeypatch, capsys):
    assert feed([(1, 2), (2, 2)], monkeypatch, capsys, progress="0") == ""
