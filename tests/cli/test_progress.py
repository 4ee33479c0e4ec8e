"""Progress when stderr is a log, not a terminal: plain lines every tenth of the work or every
30 s, nothing under --quiet."""

from __future__ import annotations

from rsvl.console import ProgressLines, state, task_progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lines_every_tenth_with_rate_and_eta():
    clock, lines = Clock(), []
    advance = ProgressLines(1200, "segment", write=lines.append, clock=clock)
    for _ in range(120):
        clock.now += 0.25
        advance(1)
    assert lines == ["segment: 120/1200 tiles, 4.0 tiles/s, eta 4m30s"]
    for _ in range(1080):
        clock.now += 0.25
        advance(1)
    assert len(lines) == 10
    assert lines[-1] == "segment: 1200/1200 tiles, 4.0 tiles/s, 5m00s"
    advance(1)  # more than announced: no second final line
    assert len(lines) == 10


def test_lines_every_30_seconds_when_a_tenth_takes_longer():
    clock, lines = Clock(), []
    advance = ProgressLines(1000, "index", unit="images", write=lines.append, clock=clock)
    for _ in range(9):
        clock.now += 10
        advance(1)
    assert lines == ["index: 3/1000 images, 0.1 images/s, eta 2h46m", "index: 6/1000 images, 0.1 images/s, eta 2h45m",
                     "index: 9/1000 images, 0.1 images/s, eta 2h45m"]


def test_task_progress_prints_lines_to_a_log_and_nothing_under_quiet(capsys, monkeypatch):
    with task_progress("segment")(20) as advance:
        for _ in range(20):
            advance(1)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 10 and err[0].startswith("segment: 2/20 tiles") and err[-1].startswith("segment: 20/20 tiles")
    monkeypatch.setattr(state, "quiet", True)
    with task_progress("segment")(20) as advance:
        advance(20)
    assert capsys.readouterr().err == ""
