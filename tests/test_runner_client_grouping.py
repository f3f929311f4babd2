"""RunnerCallBatcher (public/runner_client.py): how an API worker groups its waiting requests into runner calls
(a stand-in runner)."""

from __future__ import annotations

import asyncio

import pytest

from public.runner_client import RunnerCallBatcher


class Runner:
    """Records each call; calls stay open until the test releases them."""

    def __init__(self, hold: bool = False) -> None:
        self.calls: list[list[object]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, items: list[object]) -> list[object]:
        self.calls.append(list(items))
        await self.release.wait()
        if "boom" in items:
            raise ConnectionError("runner unreachable")
        return [f"out {item}" for item in items]


async def settle() -> None:
    for _ in range(5):  # a few loop turns: scheduled sends start and queue up
        await asyncio.sleep(0)


def test_a_lone_request_goes_out_at_once_as_its_own_call():
    async def scenario():
        runner = Runner()
        gather = RunnerCallBatcher(runner, max_items=64)
        return await gather.submit("a"), runner.calls

    assert asyncio.run(scenario()) == ("out a", [["a"]])


def test_requests_arriving_together_share_one_call():
    async def scenario():
        runner = Runner()
        gather = RunnerCallBatcher(runner, max_items=64)
        results = await asyncio.gather(*(gather.submit(i) for i in range(5)))
        return results, runner.calls

    results, calls = asyncio.run(scenario())
    assert results == [f"out {i}" for i in range(5)]
    assert calls == [[0, 1, 2, 3, 4]]


def test_with_every_slot_busy_newcomers_wait_and_leave_together():
    async def scenario():
        runner = Runner(hold=True)
        gather = RunnerCallBatcher(runner, max_items=64, max_inflight=2)
        first = [asyncio.ensure_future(gather.submit("a"))]
        await settle()
        first.append(asyncio.ensure_future(gather.submit("b")))
        await settle()
        assert runner.calls == [["a"], ["b"]]  # both slots taken
        waiting = [asyncio.ensure_future(gather.submit(x)) for x in ("c", "d", "e")]
        await settle()
        assert len(runner.calls) == 2  # nothing more goes out while both calls are open
        runner.release.set()
        return await asyncio.gather(*first, *waiting), runner.calls

    results, calls = asyncio.run(scenario())
    assert results == ["out a", "out b", "out c", "out d", "out e"]
    assert calls == [["a"], ["b"], ["c", "d", "e"]]


def test_four_calls_in_flight_by_default():
    async def scenario():
        runner = Runner(hold=True)
        gather = RunnerCallBatcher(runner, max_items=64)
        tasks = []
        for item in range(6):
            tasks.append(asyncio.ensure_future(gather.submit(item)))
            await settle()
        open_calls = len(runner.calls)
        runner.release.set()
        await asyncio.gather(*tasks)
        return open_calls, runner.calls

    open_calls, calls = asyncio.run(scenario())
    assert open_calls == 4
    assert calls == [[0], [1], [2], [3], [4, 5]]


def test_a_call_never_carries_more_than_max_items():
    async def scenario():
        runner = Runner()
        gather = RunnerCallBatcher(runner, max_items=3, max_inflight=4)
        await asyncio.gather(*(gather.submit(i) for i in range(7)))
        return runner.calls

    assert asyncio.run(scenario()) == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_failed_call_fails_each_of_its_requests_and_the_next_call_works():
    async def scenario():
        runner = Runner()
        gather = RunnerCallBatcher(runner, max_items=64)
        failed = await asyncio.gather(gather.submit("x"), gather.submit("boom"), return_exceptions=True)
        return failed, await gather.submit("y")

    failed, later = asyncio.run(scenario())
    assert all(isinstance(e, ConnectionError) for e in failed)
    assert later == "out y"


def test_a_caller_that_gave_up_is_not_sent():
    async def scenario():
        runner = Runner(hold=True)
        gather = RunnerCallBatcher(runner, max_items=64, max_inflight=1)
        first = asyncio.ensure_future(gather.submit("a"))
        await settle()
        gone = asyncio.ensure_future(gather.submit("gone"))
        kept = asyncio.ensure_future(gather.submit("kept"))
        await settle()
        gone.cancel()
        runner.release.set()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await first, await kept, runner.calls

    assert asyncio.run(scenario()) == ("out a", "out kept", [["a"], ["kept"]])
