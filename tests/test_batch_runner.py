"""BatchRunner's model thread: how runner calls become batches (no server: an event loop here drives it)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from runner.batch_runner import BatchRunner


def ModelThread(model, max_items: int, max_wait_s: float) -> BatchRunner:
    """A BatchRunner whose forward is ``model`` (no workflow): the model thread's batching alone."""
    runner = BatchRunner(None, max_items=max_items, max_wait_s=max_wait_s)
    # read by the model thread at each batch; no call has been submitted yet
    runner.forward_groups = lambda items: iter([(list(range(len(items))), model(items))])
    return runner


class Model:
    """A stand-in for the workflow's forward that records its batches and can be held busy by the test."""

    def __init__(self, hold_first: bool = False, fail_on: object = None) -> None:
        self.batches: list[list[object]] = []
        self.busy = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail_on = fail_on

    def __call__(self, items: list[object]) -> list[object]:
        self.batches.append(list(items))
        self.busy.set()
        self.release.wait(10)
        if self.fail_on in items:
            raise RuntimeError("the batch function broke")
        return [("out", item) for item in items]


async def occupy(thread: ModelThread, model: Model) -> asyncio.Future:
    """Starts a first call and returns once the model is running it, so later calls queue behind it. The event
    loop goes on meanwhile: the model runs on its own thread."""
    first = asyncio.ensure_future(thread.submit(["first"]))
    assert await asyncio.to_thread(model.busy.wait, 10)
    return first


async def queued(*calls) -> list[asyncio.Future]:
    tasks = [asyncio.ensure_future(call) for call in calls]
    await asyncio.sleep(0)  # each task runs up to its await, so its call is queued in order
    return tasks


def test_a_lone_call_runs_at_once_as_its_own_batch():
    model = Model()
    thread = ModelThread(model, max_items=64, max_wait_s=10)
    assert asyncio.run(thread.submit([1, 2])) == [("out", 1), ("out", 2)]
    assert model.batches == [[1, 2]]


def test_calls_that_queue_while_the_model_is_busy_form_the_next_batch():
    async def scenario():
        model = Model(hold_first=True)
        thread = ModelThread(model, max_items=64, max_wait_s=10)
        first = await occupy(thread, model)
        later = await queued(thread.submit(["a1", "a2"]), thread.submit(["b1"]), thread.submit(["c1", "c2", "c3"]))
        model.release.set()
        return model.batches, await first, await asyncio.gather(*later)

    batches, first, later = asyncio.run(scenario())
    assert batches == [["first"], ["a1", "a2", "b1", "c1", "c2", "c3"]]
    assert first == [("out", "first")]
    # each caller gets exactly its own slice of the shared batch
    assert later == [[("out", "a1"), ("out", "a2")], [("out", "b1")], [("out", "c1"), ("out", "c2"), ("out", "c3")]]


def test_a_batch_never_exceeds_max_items_and_calls_are_not_split():
    async def scenario():
        model = Model(hold_first=True)
        thread = ModelThread(model, max_items=4, max_wait_s=10)
        first = await occupy(thread, model)
        later = await queued(thread.submit([1, 2]), thread.submit([3, 4]), thread.submit([5, 6, 7]))
        model.release.set()
        await first
        return model.batches, await asyncio.gather(*later)

    batches, later = asyncio.run(scenario())
    assert batches == [["first"], [1, 2, 3, 4], [5, 6, 7]]
    assert later[2] == [("out", 5), ("out", 6), ("out", 7)]


def test_a_call_that_waited_past_max_wait_is_answered_503_and_not_run():
    async def scenario():
        model = Model(hold_first=True)
        thread = ModelThread(model, max_items=64, max_wait_s=0.05)
        first = await occupy(thread, model)
        [late] = await queued(thread.submit(["late1", "late2"]))
        await asyncio.sleep(0.2)  # longer than max_wait_s behind the busy model
        model.release.set()
        return model.batches, await first, await late

    batches, first, late = asyncio.run(scenario())
    assert first == [("out", "first")]  # already running when its wait ended
    assert batches == [["first"]]
    assert [outcome.status for outcome in late] == [503, 503]
    assert "MAX_LATENCY_MS" in late[0].description


def test_a_caller_that_gave_up_is_not_run():
    async def scenario():
        model = Model(hold_first=True)
        thread = ModelThread(model, max_items=64, max_wait_s=10)
        first = await occupy(thread, model)
        gone, kept = await queued(thread.submit(["gone"]), thread.submit(["kept"]))
        gone.cancel()
        await asyncio.sleep(0)
        model.release.set()
        await first
        return model.batches, await kept

    batches, kept = asyncio.run(scenario())
    assert batches == [["first"], ["kept"]]
    assert kept == [("out", "kept")]


def test_a_broken_batch_fails_its_callers_and_the_thread_goes_on():
    model = Model(fail_on="boom")
    thread = ModelThread(model, max_items=64, max_wait_s=10)
    with pytest.raises(RuntimeError, match="the batch function broke"):
        asyncio.run(thread.submit(["boom"]))
    assert asyncio.run(thread.submit(["fine"])) == [("out", "fine")]


def test_a_call_with_no_requests_is_answered_with_none():
    model = Model()
    thread = ModelThread(model, max_items=64, max_wait_s=10)
    assert asyncio.run(thread.submit([])) == []
    assert asyncio.run(thread.submit([7])) == [("out", 7)]


def test_a_call_marked_alone_is_a_batch_of_its_own():
    # An API worker's suspect (a request that was in the runner when its process died) must run with no other call's
    # requests: if the process dies again, that request was running (public/runner_client.py CrashWatch).
    async def scenario():
        model = Model(hold_first=True)
        thread = ModelThread(model, max_items=64, max_wait_s=10)
        first = await occupy(thread, model)
        later = await queued(
            thread.submit(["a1"]), thread.submit(["s"], alone=True), thread.submit(["b1"]), thread.submit(["c1"])
        )
        model.release.set()
        await first
        return model.batches, await asyncio.gather(*later)

    batches, later = asyncio.run(scenario())
    assert batches == [["first"], ["a1"], ["s"], ["b1", "c1"]]
    assert later == [[("out", "a1")], [("out", "s")], [("out", "b1")], [("out", "c1")]]
