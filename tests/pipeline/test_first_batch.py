"""FirstBatchAhead: the training loop's first batch is fetched while the worker sets up."""
import threading

import pytest

from pipeline.loop import FirstBatchAhead


def test_first_batch_is_fetched_before_it_is_asked_for_and_order_is_kept():
    started = threading.Event()

    def gen():
        started.set()  # runs in the background thread as soon as the wrapper exists
        yield from ("a", "b", "c")

    ahead = FirstBatchAhead(gen())
    assert started.wait(5), "the first batch was not requested in the background"
    assert [ahead.next(), ahead.next(), ahead.next(), ahead.next()] == ["a", "b", "c", None]


def test_an_error_of_the_first_fetch_reaches_the_caller():
    def gen():
        raise OSError("shard unreadable")
        yield

    ahead = FirstBatchAhead(gen())
    with pytest.raises(OSError, match="shard unreadable"):
        ahead.next()


def test_an_empty_stream_ends_at_once():
    assert FirstBatchAhead(iter(())).next() is None
