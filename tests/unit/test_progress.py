"""The CLI's progress: a bar on a terminal, a short line per quarter of the work in a log file."""

import re

import pytest

from musc_tasks.progress import ArtifactPace, progress_bar


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


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_an_artifact_moves_a_step_at_a_time_and_at_most_once_an_interval():
    clock = Clock()
    pace = ArtifactPace(min_step=5.0, min_interval=1.0, clock=clock)
    sent = []
    for tenth in range(1, 51):  # 5 s of work, 2 % a tenth of a second
        clock.now = tenth / 10
        percent = 2.0 * tenth
        if pace.due(percent, final=percent == 100.0):
            sent.append(percent)
    assert sent == [20.0, 40.0, 60.0, 80.0, 100.0]  # once a second, and the end as it comes


@pytest.mark.parametrize(
    "calls, expected",
    [
        ([(0.0, 2.0, False), (100.0, 2.1, True)], [100.0]),  # 0 % is where the artifact starts
        ([(4.0, 9.0, False), (6.0, 9.0, False)], [6.0]),  # a pause is not enough without a step
        ([(50.0, 0.5, False), (100.0, 0.6, True), (100.0, 5.0, True)], [100.0]),  # the end once
        ([(30.0, 0.2, True)], [30.0]),  # a final value is never held back
    ],
)
def test_an_artifact_update_is_due_on_a_step_and_a_pause_or_at_the_end(calls, expected):
    clock = Clock()
    pace = ArtifactPace(min_step=5.0, min_interval=1.0, clock=clock)
    sent = []
    for percent, now, final in calls:
        clock.now = now
        if pace.due(percent, final=final):
            sent.append(percent)
    assert sent == expected
