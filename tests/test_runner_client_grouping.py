"""RunnerCallBatcher (public/runner_client.py): how an API worker groups its waiting requests into runner calls
(a stand-in runner)."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import Outcome
from public.runner_client import ConnectionLost, CrashWatch, RunnerCallBatcher, request_digest


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


class DyingRunner:
    """A stand-in runner whose process dies (the connection is lost) whenever a call holds "crash"; records each call
    and whether it was marked ``alone``. The real runner's death is tested over HTTP in tests/test_crash_recovery.py;
    here the clock and the memory's bounds are."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[object], bool]] = []

    async def __call__(self, items: list[object], alone: bool = False) -> list[Outcome]:
        self.calls.append((list(items), alone))
        await asyncio.sleep(0)
        if "crash" in items:
            raise ConnectionLost(answered=False)
        return [Outcome(200, f"out {item}") for item in items]


def test_requests_in_the_runner_when_it_died_are_sent_alone_and_a_second_death_refuses_the_input(caplog):
    async def scenario():
        runner = DyingRunner()
        gather = RunnerCallBatcher(runner, max_items=64)
        assert not gather.crashes.watching
        first = await asyncio.gather(gather.submit("crash"), gather.submit("good"), return_exceptions=True)
        assert [type(e) for e in first] == [ConnectionLost, ConnectionLost]
        await asyncio.sleep(0.2)  # the death's one log line
        good, crashed = await gather.submit("good"), await gather.submit("crash")
        refused, other = await gather.submit("crash"), await gather.submit("other")
        await asyncio.sleep(0.2)
        return runner.calls, good, crashed, refused, other, gather.crashes

    calls, good, crashed, refused, other, crashes = asyncio.run(scenario())
    assert calls == [(["crash", "good"], False), (["good"], True), (["crash"], True), (["other"], False)]
    assert good == Outcome(200, "out good") and other == Outcome(200, "out other")
    assert crashed == refused and crashed.status == 422 and "crashed the model's process" in crashed.description
    died = [r for r in caplog.records if "runner process died" in r.getMessage()]
    assert [r.levelname for r in died] == ["ERROR", "ERROR"]
    assert "2 request(s)" in died[0].getMessage() and "1 of them sent alone" in died[1].getMessage()
    assert all("crash" not in r.getMessage().replace("crashed", "") for r in died)  # no request data
    assert crashes.watching  # the poison is remembered


def test_the_memory_of_a_death_is_bounded_and_expires():
    async def scenario():
        runner = DyingRunner()
        gather = RunnerCallBatcher(runner, max_items=64)
        gather.crashes = CrashWatch(suspect_s=0.2, poison_s=0.2, max_remembered=2)
        await asyncio.gather(*(gather.submit(i) for i in ("crash", "a", "b")), return_exceptions=True)
        # Evicted by "a" and "b": batched again, and the runner dies again.
        await asyncio.gather(gather.submit("crash"), return_exceptions=True)
        await asyncio.sleep(0.3)
        gather.crashes.forget_expired()
        return runner.calls, gather.crashes.watching

    calls, watching = asyncio.run(scenario())
    assert calls == [(["crash", "a", "b"], False), (["crash"], False)]
    assert not watching  # expired: requests are no longer hashed


def test_equal_data_has_equal_digests_whatever_the_key_order():
    first = {"dtype": "float", "values": [[1.0, 2.0]], "shape": [1, 2]}
    assert request_digest(first) == request_digest({"shape": [1, 2], "values": [[1.0, 2.0]], "dtype": "float"})
    assert request_digest(first) != request_digest({**first, "values": [[1.0, 2.5]]})
    assert request_digest(2**70) == request_digest(2**70)  # beyond JSON's integers: pickled instead


def test_what_one_api_worker_learns_of_a_death_the_others_of_its_server_know(tmp_path):
    # Two workers in one process stand for two processes here (tests/test_crash_recovery.py runs the real ones):
    # each maps the server's counter and reads the server's records file, as separate processes do.
    directory = tmp_path / "server"
    directory.mkdir()
    (directory / "changes").write_bytes(bytes(8))

    async def scenario():
        runners = DyingRunner(), DyingRunner()
        first, second = (RunnerCallBatcher(r, max_items=64) for r in runners)
        first.crashes, second.crashes = CrashWatch(directory=directory), CrashWatch(directory=directory)
        await asyncio.gather(first.submit("crash"), first.submit("good"), return_exceptions=True)
        crashed = await second.submit("crash")  # never seen by this worker: sent alone, and refused
        refused = await first.submit("crash")  # refused by the other without reaching the runner
        good = await second.submit("good")
        return [r.calls for r in runners], crashed, refused, good

    calls, crashed, refused, good = asyncio.run(scenario())
    assert calls == [[(["crash", "good"], False)], [(["crash"], True), (["good"], True)]]
    assert crashed == refused and crashed.status == 422
    assert good == Outcome(200, "out good")
    stored = (directory / "records.json").read_text()
    assert "crash" not in stored and "good" not in stored  # digests only, never a request's data
