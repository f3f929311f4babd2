"""The per-request deadline (core/asgi.py ``ShutdownBound.bounded``) on a real event loop, nothing stood in for: it
keeps ``asyncio.timeout``'s semantics (its own cancellation becomes TimeoutError, anyone else's stays a cancellation),
and after SIGTERM (``stop_within``) a request still running ends as the contract's 503. Over HTTP the same paths are
the 504, 408 and shutdown tests (test_http_edges.py, test_shutdown.py); these run each branch in milliseconds."""

from __future__ import annotations

import asyncio

import pytest

from core.asgi import ShutdownBound
from core.errors import RequestError


def test_a_block_past_its_deadline_raises_timeout_error_and_the_task_is_not_left_cancelled():
    async def main():
        bound = ShutdownBound()
        with pytest.raises(TimeoutError), bound.bounded(0.01):
            await asyncio.sleep(5)
        assert asyncio.current_task().cancelling() == 0
        await asyncio.sleep(0)  # no cancellation left pending for the next await
        return bound._running

    assert asyncio.run(main()) == {}


def test_a_block_within_its_deadline_returns_and_its_timer_is_gone():
    async def main():
        bound = ShutdownBound()
        with bound.bounded(0.05):
            await asyncio.sleep(0)
            value = 7
        await asyncio.sleep(0.1)  # past the deadline: nothing fires into the task
        return value

    assert asyncio.run(main()) == 7


def test_a_cancellation_from_elsewhere_stays_a_cancellation_even_after_the_deadline():
    async def inner(bound, started):
        with bound.bounded(0.01):
            started.set()
            try:
                await asyncio.sleep(5)
            finally:
                # The deadline has passed too (its cancellation is in): another cancellation was asked, so the
                # block ends as a cancellation, as asyncio.timeout does.
                await asyncio.sleep(0.05)

    async def main():
        bound, started = ShutdownBound(), asyncio.Event()
        task = asyncio.ensure_future(inner(bound, started))
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        plain = asyncio.ensure_future(inner(bound, started))
        await asyncio.sleep(0)
        plain.cancel()  # before the deadline
        with pytest.raises(asyncio.CancelledError):
            await plain

    asyncio.run(main())


def test_shutdown_moves_running_deadlines_forward_and_bounds_later_ones():
    async def request(bound, seconds):
        with bound.bounded(seconds):
            await asyncio.sleep(5)

    async def main():
        bound = ShutdownBound()
        loop = asyncio.get_running_loop()
        running = asyncio.ensure_future(request(bound, 60))
        await asyncio.sleep(0)
        started = loop.time()
        bound.stop_within(0.05)
        with pytest.raises(RequestError) as refused:
            await running
        assert refused.value.status == 503
        assert refused.value.description == (
            "the service is shutting down; the request did not finish within 0.05 s (SHUTDOWN_TIMEOUT_S)"
        )
        assert loop.time() - started < 2
        # A request entered once the bound has passed ends at the next turn of the loop, with the same 503.
        with pytest.raises(RequestError) as late:
            await request(bound, 60)
        assert late.value.status == 503
        # A deadline earlier than the shutdown's stays its own: TimeoutError (a 504 or 408 in ``limited``).
        bound.stop_within(30)
        with pytest.raises(TimeoutError):
            await request(bound, 0.01)
        return bound._running

    assert asyncio.run(main()) == {}


def test_outside_a_task_the_deadline_refuses_to_start():
    async def main():
        loop = asyncio.get_running_loop()
        bound = ShutdownBound()
        done = loop.create_future()

        def callback():
            try:
                with bound.bounded(1):
                    pass
            except Exception as e:  # any other error fails the test instead of hanging it
                done.set_result(f"{type(e).__name__}: {e}")

        loop.call_soon(callback)
        return await done

    assert asyncio.run(main()) == "RuntimeError: a request's deadline is entered inside a task"


def test_each_request_ends_at_its_own_deadline_under_the_one_shared_timer():
    async def request(bound, seconds, works_for, ended):
        try:
            with bound.bounded(seconds):
                await asyncio.sleep(works_for)
            ended.append((seconds, "answered"))
        except TimeoutError:
            ended.append((seconds, "timed out"))

    async def main():
        bound, ended = ShutdownBound(), []
        first = asyncio.ensure_future(request(bound, 0.4, 5, ended))
        await asyncio.sleep(0)
        # Entered later with an earlier deadline: the timer is brought forward for it.
        earlier = asyncio.ensure_future(request(bound, 0.05, 5, ended))
        in_time = asyncio.ensure_future(request(bound, 1.0, 0.2, ended))
        await asyncio.gather(first, earlier, in_time)
        # A request that ends at once leaves the timer armed for its deadline; the one after it still times out.
        quick = asyncio.ensure_future(request(bound, 0.02, 0, ended))
        later = asyncio.ensure_future(request(bound, 0.1, 5, ended))
        await asyncio.gather(quick, later)
        return ended, bound._running

    ended, running = asyncio.run(main())
    assert ended == [
        (0.05, "timed out"),
        (1.0, "answered"),
        (0.4, "timed out"),
        (0.02, "answered"),
        (0.1, "timed out"),
    ]
    assert running == {}


def test_one_bound_serves_a_second_event_loop():
    bound = ShutdownBound()

    async def in_time():
        with bound.bounded(0.01):  # leaves the timer armed on this loop, which then ends
            pass

    async def too_long():
        with pytest.raises(TimeoutError), bound.bounded(0.05):  # later than that timer: only the loop differs
            await asyncio.sleep(5)

    asyncio.run(in_time())
    asyncio.run(too_long())


async def running_request(bound: ShutdownBound) -> asyncio.Task:
    """A request inside its 60 s deadline, started and waiting."""

    async def request():
        with bound.bounded(60):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(request())
    await asyncio.sleep(0)
    return task


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_request_cut_off_by_shutdown_is_the_503_even_when_the_timer_fires_early(loop):
    # uvloop rounds timers to the millisecond and may run one ~0.5 ms early: judged by the clock at the end, a request
    # cut off by the shutdown's bound was a 504 (REQUEST_TIMEOUT_S) in ~40 % of the tries. The bound is what ended it.
    async def one():
        bound = ShutdownBound()
        task = await running_request(bound)
        bound.stop_within(0.0123)
        try:
            await task
        except RequestError as e:
            return e.status
        except TimeoutError:
            return 504

    async def main():
        return [await one() for _ in range(40)]

    run = asyncio.run if loop == "asyncio" else pytest.importorskip("uvloop").run
    assert run(main()) == [503] * 40


def test_a_second_sigterm_does_not_turn_the_first_bounds_503_into_a_504():
    async def main():
        bound = ShutdownBound()
        task = await running_request(bound)
        bound.stop_within(0.02)
        bound.stop_within(10)  # a second SIGTERM: later requests get the new bound, this one keeps the first
        with pytest.raises(RequestError) as refused:
            await task
        return refused.value.status

    assert asyncio.run(main()) == 503


def test_requests_left_running_on_an_ended_loop_do_not_stop_the_next_loops_deadlines():
    bound = ShutdownBound()

    async def forever():
        with bound.bounded(0.05):
            await asyncio.sleep(3600)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(asyncio.sleep(0))
    left = loop.create_task(forever())
    loop.run_until_complete(asyncio.sleep(0.01))  # entered, then the loop ends with the request still in its block
    loop.close()
    assert not left.done()

    async def main():
        with pytest.raises(TimeoutError), bound.bounded(0.05):
            await asyncio.sleep(2)
        return bound._running

    assert asyncio.run(asyncio.wait_for(main(), 5)) == {}
