"""Sends the requests waiting in one API worker to the runner together, in one call.

There is no timer: a request is sent on the next turn of the event loop, so a lone request never waits.
While ``max_inflight`` calls are out, newcomers queue and leave together in the next call, so batches grow
with load by themselves. One call per group matters: each hop to the runner costs more than a small forward.

Four calls in flight, not two: with two, a worker whose calls were both in the model's batch had none waiting for
the next one, so the model started it without that worker's requests. With four, every worker keeps a call queued
behind the running batch: heavy c=64 batches grew from ~23 to ~31 requests and throughput by 8-15 %; eight was no
better (docs/performance.md, section 14).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from core.outcome import Outcome

# Sends the data of several requests to the runner in one call; one outcome per request, in order.
RunnerCall = Callable[[list[Any]], Awaitable[list[Outcome]]]


class RunnerCallBatcher:
    """One API worker's requests, sent to the runner in groups of at most ``max_items``, at most ``max_inflight``
    calls at a time. On the worker's event loop; a failed call fails every request of its group with its error."""

    def __init__(self, call: RunnerCall, max_items: int, max_inflight: int = 4) -> None:
        self._call = call
        self._max_items = max_items
        self._max_inflight = max_inflight
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def submit(self, item: Any) -> Outcome:
        """The outcome of one request's ``item`` (its data), sent with the others waiting now."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((item, future))
        self._schedule(loop)
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._pending and self._inflight < self._max_inflight:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending and self._inflight < self._max_inflight:
            group, self._pending = self._pending[: self._max_items], self._pending[self._max_items :]
            group = [(item, future) for item, future in group if not future.done()]  # callers that gave up
            if group:
                self._inflight += 1
                task = asyncio.ensure_future(self._send(group))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._call([item for item, _ in group])
            if len(results) != len(group):
                raise RuntimeError(f"runner returned {len(results)} results for {len(group)} requests")
            for (_, future), result in zip(group, results):
                if not future.done():
                    future.set_result(result)
        except BaseException as e:  # every waiting caller must hear of the failure
            for _, future in group:
                if not future.done():
                    future.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._inflight -= 1
            self._schedule(asyncio.get_running_loop())
