"""The progress display: a bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import threading
import time

from batch_pipeline.entrypoints.console import ProgressDisplay, ProgressWatcher, Snapshot


class Clock:
    """A time.monotonic() that moves only when told."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_plain_lines_only_when_the_count_moves():
    out = io.StringIO()
    with ProgressDisplay("b1", stream=out, tty=False, interval=0) as display:
        for done in (0, 0, 100, 100, 300):
            display.show(Snapshot(done, 300, done * 8, "in_progress"))
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0].split(" [")[0] for line in lines] == [
        "progress: 0/300 requests", "progress: 100/300 requests", "progress: 300/300 requests"]
    assert "ETA" in lines[1] and lines[-1].endswith("[in_progress]")


def test_a_terminal_gets_a_bar_with_counts_rate_and_status():
    out = io.StringIO()
    with ProgressDisplay("batch-x", stream=out, tty=True) as display:
        display.show(Snapshot(120, 300, 960, "in_progress", generating_since=time.monotonic() - 2))
    text = out.getvalue()
    assert "batch-x" in text and "120/300" in text and "tok/s" in text and "in_progress" in text
    assert "progress:" not in text


class Progress:
    """A snapshot source that says how often the watcher has read it."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.reads = 0
        self.read_again = threading.Condition()

    def __call__(self) -> Snapshot | None:
        with self.read_again:
            self.reads += 1
            self.read_again.notify_all()
            return self.snapshot

    def set_and_wait_until_shown(self, snapshot: Snapshot) -> None:
        """Set the snapshot, and return once the watcher has read it and shown it (it read again after that)."""
        with self.read_again:
            self.snapshot, shown_after = snapshot, self.reads + 2
            assert self.read_again.wait_for(lambda: self.reads >= shown_after, timeout=60), "the watcher stopped reading"


def test_the_watcher_shows_the_last_state_when_it_stops():
    out = io.StringIO()
    progress = Progress()
    with ProgressWatcher(ProgressDisplay("b", stream=out, tty=False), progress, interval=0.01):
        progress.set_and_wait_until_shown(Snapshot(5, 10, 40))
        progress.snapshot = Snapshot(10, 10, 80)  # the work ends; the watcher is stopped right after
    assert out.getvalue().splitlines()[0].startswith("progress: 5/10 requests")
    assert out.getvalue().splitlines()[-1].startswith("progress: 10/10 requests")


def test_the_rate_is_tokens_over_generation_time_when_every_chunk_lands_at_once():
    # 303 requests in two chunks written together at the end of 10 s of generation (after a 20 s engine
    # load): the line must say what the run's summary says (53,160 tokens / 10 s), not 0 tok/s.
    clock, out = Clock(), io.StringIO()
    display = ProgressDisplay("b", stream=out, tty=False, clock=clock)
    clock.now += 20
    started = clock.now  # the engine is ready and the chunks can run
    for _ in range(20):
        display.show(Snapshot(0, 303, 0, generating_since=started))
        clock.now += 0.5
    display.show(Snapshot(303, 303, 53_160, generating_since=started))
    display.show(Snapshot(303, 303, 53_160, generating_since=started))  # polled again after the run
    lines = out.getvalue().splitlines()
    assert lines[0] == "progress: 0/303 requests"  # no rate before there are tokens, and never a made-up 0
    assert lines[-1] == "progress: 303/303 requests, 5,316 tok/s"


def test_the_rate_holds_between_chunks_and_stops_at_the_last_tokens():
    clock, out = Clock(), io.StringIO()
    display = ProgressDisplay("b", stream=out, tty=False, interval=0, clock=clock)
    started = clock.now
    clock.now += 4
    display.show(Snapshot(100, 300, 4_000, generating_since=started))  # 1,000 tok/s
    clock.now += 2
    assert display.rate(Snapshot(100, 300, 4_000, generating_since=started)) == 1_000  # no new chunk: unchanged
    clock.now += 2
    display.show(Snapshot(300, 300, 8_000, generating_since=started))
    clock.now += 30  # the run's end, long after its last tokens
    assert display.rate(Snapshot(300, 300, 8_000, generating_since=started)) == 1_000


def test_plain_lines_come_every_few_seconds_and_always_at_the_end():
    clock, out = Clock(), io.StringIO()
    display = ProgressDisplay("b", stream=out, tty=False, interval=5, clock=clock)
    started = clock.now
    for second in range(12):  # a chunk every second
        display.show(Snapshot(second * 10, 120, second * 100, generating_since=started))
        clock.now += 1
    display.show(Snapshot(120, 120, 1_200, generating_since=started))
    counts = [line.split(",")[0] for line in out.getvalue().splitlines()]
    # The first line, the first with a rate (second 1), then every 5 s, and the last.
    assert counts == ["progress: 0/120 requests", "progress: 10/120 requests", "progress: 60/120 requests",
                      "progress: 110/120 requests", "progress: 120/120 requests"]
