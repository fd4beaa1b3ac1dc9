"""Progress bars per task group, driven by ordinary futures finishing in other threads.

The futures are ``concurrent.futures.Future``s carrying a ``key``, finished by a thread:
the same ``key``/``done``/``add_done_callback`` surface the client's futures offer.
"""

from __future__ import annotations

import concurrent.futures
import io
import threading
import time
from typing import Any

import trio
from dask import delayed

from trioscheduler.client.collections import collections_to_graph
from trioscheduler.client.progress import ProgressTracker, aprogress, progress


class KeyedFuture(concurrent.futures.Future[Any]):
    def __init__(self, key: Any) -> None:
        super().__init__()
        self.key = key


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def finish_later(
    futures: list[KeyedFuture], delay: float = 0.005, fail: set[Any] = frozenset()
) -> threading.Thread:
    def run() -> None:
        for f in futures:
            time.sleep(delay)
            if f.key in fail:
                f.set_exception(ZeroDivisionError(f.key))
            else:
                f.set_result(f.key)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def make(prefix: str, n: int) -> list[KeyedFuture]:
    return (
        [KeyedFuture(f"{prefix}-{i:032x}") for i in range(n)]
        if prefix != "chunk"
        else [KeyedFuture((f"{prefix}-0123456789abcdef0123456789abcdef", i)) for i in range(n)]
    )


def test_plain_text_when_not_a_terminal_shows_each_group_to_completion() -> None:
    futures = make("inc", 10) + make("chunk", 5)
    worker = finish_later(futures)
    out = io.StringIO()
    progress(futures, file=out, interval=0.01, text_interval=0.05)
    worker.join()
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    last = text.strip().splitlines()[-2:]
    assert "100% inc: 10/10" in last[0]
    assert "100% chunk: 5/5" in last[1]
    assert len(text.splitlines()) >= 3  # intermediate lines while running


def test_tqdm_bars_on_a_terminal() -> None:
    futures = make("inc", 8) + make("sum", 2)
    worker = finish_later(futures)
    out = Terminal()
    progress(futures, file=out, interval=0.01)
    worker.join()
    text = out.getvalue()
    assert "\r" in text  # a redrawn bar, not lines
    assert "inc" in text and "8/8" in text
    assert "sum" in text and "2/2" in text


def test_erred_futures_count_as_done_and_are_reported() -> None:
    futures = make("div", 6)
    worker = finish_later(futures, fail={futures[1].key, futures[4].key})
    out = io.StringIO()
    progress(*futures, file=out, interval=0.01)
    worker.join()
    assert "div: 6/6, 2 erred" in out.getvalue().splitlines()[-1]


def test_done_futures_and_empty_input_return_at_once() -> None:
    futures = make("inc", 3)
    for f in futures:
        f.set_result(1)
    out = io.StringIO()
    progress(futures, file=out)  # returns: nothing left to wait for
    assert "inc: 3/3" in out.getvalue()
    empty = io.StringIO()
    progress([], file=empty)
    assert empty.getvalue() == ""


def test_progress_of_a_persisted_collection_finds_its_futures() -> None:
    parts = [delayed(abs)(i) for i in range(4)]
    g = collections_to_graph(parts, persist=True)
    futures = {k: KeyedFuture(k) for k in g.flat_keys}
    persisted = g.rebuild(futures)
    worker = finish_later(list(futures.values()))
    out = io.StringIO()
    progress(persisted, file=out, interval=0.01)
    worker.join()
    assert "abs: 4/4" in out.getvalue().splitlines()[-1]


def test_tracker_counts_each_future_once_even_if_listed_twice() -> None:
    futures = make("inc", 2)
    tracker = ProgressTracker([*futures, *futures])
    assert [(g.name, g.total, g.done) for g in tracker.snapshot()] == [("inc", 2, 0)]
    futures[0].set_result(1)
    assert tracker.snapshot()[0].done == 1 and not tracker.finished
    futures[1].set_result(1)
    assert tracker.finished


async def test_aprogress_does_not_block_the_trio_loop() -> None:
    futures = make("inc", 5)
    out = io.StringIO()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.005)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            worker = finish_later(futures, delay=0.02)
            await aprogress(futures, file=out, interval=0.01)
            nursery.cancel_scope.cancel()
    worker.join()
    assert ticks > 5
    assert "inc: 5/5" in out.getvalue()


def test_notebook_without_widgets_falls_back_to_a_text_bar() -> None:
    futures = make("inc", 4)
    worker = finish_later(futures)
    out = io.StringIO()
    progress(futures, notebook=True, file=out, interval=0.01)
    worker.join()
    assert "4/4" in out.getvalue()
