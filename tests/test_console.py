"""The progress display: a bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import time

from batch_pipeline.entrypoints.console import ProgressDisplay, ProgressWatcher, Snapshot


def test_plain_lines_only_when_the_count_moves():
    out = io.StringIO()
    with ProgressDisplay("b1", stream=out, tty=False) as display:
        for done in (0, 0, 100, 100, 300):
            display.show(Snapshot(done, 300, done * 8, "in_progress"))
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "progress: 0/300 requests", "progress: 100/300 requests", "progress: 300/300 requests"]
    assert "ETA" in lines[1] and lines[-1].endswith("[in_progress]")


def test_a_terminal_gets_a_bar_with_counts_rate_and_status():
    out = io.StringIO()
    with ProgressDisplay("batch-x", stream=out, tty=True) as display:
        display.show(Snapshot(120, 300, 960, "in_progress"))
    text = out.getvalue()
    assert "batch-x" in text and "120/300" in text and "tok/s" in text and "in_progress" in text
    assert "progress:" not in text


def test_the_watcher_shows_the_last_state_when_it_stops():
    out = io.StringIO()
    state = {"now": None}
    with ProgressWatcher(ProgressDisplay("b", stream=out, tty=False), lambda: state["now"], interval=0.01):
        time.sleep(0.05)
        state["now"] = Snapshot(5, 10, 40)
        time.sleep(0.05)
        state["now"] = Snapshot(10, 10, 80)  # the work ends; the watcher is stopped right after
    assert out.getvalue().splitlines()[0].startswith("progress: 5/10 requests")
    assert out.getvalue().splitlines()[-1].startswith("progress: 10/10 requests")
