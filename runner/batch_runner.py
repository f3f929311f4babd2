"""The runner's batch runner: requests in, one ``Outcome`` each out; batches form from the calls that queue.

Read top to bottom, a call's path through it:

    infer(requests)        event loop   the whole path of one API worker's call (service.py's ``infer`` spells it out)
      preprocess           event loop   per request: the model's input and batch key, or its failure
      submit               event loop   queue the call for the model thread; wait for its share of the batch
        _serve             model thread one batch after another
        _form_batch        model thread every call that queued meanwhile, up to ``max_items`` requests
        _run_batch         model thread forward (equal keys share one; failures isolated per item), each call
                                        answered as soon as its own requests are done
      postprocess          event loop   per request: its ``Outcome``

Pre- and postprocessing run on the event loop alongside the forward of another batch (docs/performance.md,
section 15); only the forward needs the model's thread. A lone call starts at once; calls that arrive while the
model is busy queue and form the next batch, which the thread takes the moment the previous one ends: nothing
waits for the event loop between batches, which with BentoML's dispatcher left the model idle for 2.5-4.6 ms per
batch (section 11). The steps themselves are the workflow's (workflows/base.py), shared with ``run_batch``.

``Drain`` (at the end) is how the runner stops taking calls: service.py's ``infer`` runs each call inside
``Drain.working``, and SIGTERM is handed on to the server once no call is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from core import crash_records
from core.asgi import bound_uvicorn
from core.crash_records import request_digest
from core.errors import Outcome, Overloaded, failure
from core.model_call import ForModel
from workflows.base import check_on_first_request, forward_groups, postprocess_all, preprocess_all

log = logging.getLogger("runner.batch_runner")


class BatchRunner:
    """One workflow behind one model thread. ``max_items``: requests per batch (MAX_BATCH_SIZE); a call that waited
    longer than ``max_wait_s`` (MAX_LATENCY_MS) for the model is answered 503 instead of run; ``on_batch(n)`` is told
    each batch's size, on the model thread."""

    def __init__(
        self,
        workflow: Any,
        max_items: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] | None = None,
        registry: Any = None,
    ) -> None:
        self.workflow = workflow
        # runner/model_registry.py ModelRegistry when ALLOWED_MODELS allows per-request models; None otherwise.
        self.registry = registry
        self._max_items = max_items
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        # This server's directory of what its processes know of the runner's deaths (None outside ``bentoml serve``).
        self.crash_records = crash_records.this_server()
        crash_records.forget_waiting(self.crash_records)
        self._calls: deque[_Call] = deque()
        self._queued = threading.Condition()
        self._batch_since: float | None = None  # time.monotonic() when the model thread took its current batch
        self._thread = threading.Thread(target=self._serve, name="model", daemon=True)
        self._thread.start()

    # The event loop's side.

    async def infer(self, requests: list[Any]) -> list[Outcome]:
        """One ``Outcome`` per request's data, in order; one bad request never fails another."""
        return self.postprocess(await self.submit(self.preprocess(requests)), requests)

    def preprocess(self, requests: list[Any]) -> list[Any]:
        """On the event loop: per request, its model input and batch key, or the ``Outcome`` of its failure."""
        return preprocess_all(self.workflow, requests)

    async def submit(self, prepared: list[Any], alone: bool = False, keys: list[bytes] | None = None) -> list[Any]:
        """On the event loop: queue ``prepared`` for the model thread and wait for its share of the batch it ran in
        (per entry: the model's output, or an ``Outcome``). ``alone``: the call forms a batch of its own; ``keys``:
        its requests' digests, marked waiting until the model thread takes it."""
        loop = asyncio.get_running_loop()
        call = _Call(prepared, loop, loop.create_future(), alone)
        if keys:
            call.waiting = crash_records.waiting(self.crash_records, keys)
        with self._queued:
            self._calls.append(call)
            self._queued.notify()
        return await call.future

    def postprocess(self, forwarded: list[Any], requests: list[Any] | None = None) -> list[Outcome]:
        """On the event loop: per request, its ``Outcome``; ``requests`` (those preprocessed) say which outputs
        each asks for (core/model_call.py ``AskedFor``)."""
        return postprocess_all(self.workflow, forwarded, requests)

    async def infer_alone(self, requests: list[Any]) -> list[Outcome]:
        """On the event loop: ``infer`` for a call marked ``alone``, whose request was in the runner when its process
        died. The model thread runs the call as a batch of its own, no other call's requests with it, so if the
        process dies again the API worker knows this request was running (public/runner_client.py ``CrashWatch``)."""
        # Marked waiting while queued (core/crash_records.py): if the process dies before the model thread takes the
        # call, the API worker knows this request did not kill it.
        keys = [request_digest(r) for r in requests] if self.crash_records is not None else []
        if self.names_models(requests):
            return await self.infer_for_models(requests, alone=True, keys=keys)
        return self.postprocess(await self.submit(self.preprocess(requests), alone=True, keys=keys), requests)

    def names_models(self, requests: list[Any]) -> bool:
        """Whether any request names a per-request model (``ForModel``); False at once without a registry."""
        return self.registry is not None and any(type(r) is ForModel for r in requests)

    async def infer_for_models(
        self, requests: list[Any], alone: bool = False, keys: list[bytes] | None = None
    ) -> list[Outcome]:
        """On the event loop: ``infer`` for a call where some requests name a per-request model. Each model is
        looked up (or loaded, once, off the model thread) in the registry; each request is pre- and
        postprocessed by its model's workflow, and in the model thread requests of different models never share
        a forward. A model that cannot be loaded fails only its own requests."""
        assert self.registry is not None
        counts: dict[str, int] = {}
        for request in requests:
            if type(request) is ForModel:
                counts[request.model_id] = counts.get(request.model_id, 0) + 1
        found = await asyncio.gather(*(self.registry.get(m, n) for m, n in counts.items()), return_exceptions=True)
        workflows = dict(zip(counts, found))
        chosen: list[Any] = []
        datas: list[Any] = []
        prepared: list[Any] = []
        for request in requests:
            workflow, data = (
                (workflows[request.model_id], request.data)
                if type(request) is ForModel
                else (
                    self.workflow,
                    request,
                )
            )
            chosen.append(workflow)
            datas.append(data)
            if isinstance(workflow, BaseException):
                prepared.append(_Routed(None, failure(workflow)))
                continue
            [entry] = preprocess_all(workflow, [data])
            prepared.append(_Routed(None, entry) if isinstance(entry, Outcome) else _Routed(workflow, entry))
        forwarded = await self.submit(prepared, alone, keys)
        return [
            result if isinstance(result, Outcome) else postprocess_all(workflow, [result], [data])[0]
            for workflow, data, result in zip(chosen, datas, forwarded)
        ]

    # The model thread's side.

    def forward_groups(self, prepared: list[Any]) -> Iterator[tuple[list[int], list[Any]]]:
        """On the model thread: one batch's forward passes (workflows/base.py ``forward_groups``), yielding each
        request's result as soon as it is known; with per-request models in the batch, per model."""
        for entry in prepared:
            if type(entry) is _Routed:
                return self._forward_per_model(prepared)
        return forward_groups(self.workflow, prepared)

    def _forward_per_model(self, prepared: list[Any]) -> Iterator[tuple[list[int], list[Any]]]:
        done: list[int] = []
        groups: dict[int, tuple[Any, list[int], list[Any]]] = {}
        for i, entry in enumerate(prepared):
            if type(entry) is _Routed:
                if entry.workflow is None:  # failed before the model: its Outcome is the answer
                    done.append(i)
                    continue
                workflow, value = entry.workflow, entry.entry
            else:  # another API worker's call for the default model, batched with this one
                workflow, value = self.workflow, entry
            group = groups.setdefault(id(workflow), (workflow, [], []))
            group[1].append(i)
            group[2].append(value)
        if done:
            yield done, [prepared[i].entry for i in done]
        for workflow, indices, values in groups.values():
            for places, results in forward_groups(workflow, check_on_first_request(workflow, values)):
                yield [indices[p] for p in places], results

    def _serve(self) -> None:
        while True:
            calls = self._form_batch()
            started = time.monotonic()
            ready: list[_Call] = []
            for call in calls:
                waited = started - call.queued
                if waited <= self._max_wait_s:
                    ready.append(call)
                    continue
                error = Overloaded(f"the model is overloaded: waited {waited:.1f} s for it (MAX_LATENCY_MS); retry")
                call.answer([failure(error)] * len(call.items))
            if ready:
                self._run_batch(ready)

    def _form_batch(self) -> list[_Call]:
        """Wait for a call; take it and every call queued behind it, up to ``max_items`` requests in all. A call
        marked ``alone`` is a batch of its own."""
        with self._queued:
            while not self._calls:
                self._queued.wait()
            calls: list[_Call] = []
            size = 0
            while self._calls and (not calls or size + len(self._calls[0].items) <= self._max_items):
                if calls and self._calls[0].alone:
                    break
                call = self._calls.popleft()
                if call.waiting:  # taken: from here on, a death may be this call's own
                    crash_records.taken(call.waiting)
                if not call.future.done():  # a caller that gave up is not run
                    calls.append(call)
                    size += len(call.items)
                    if call.alone:
                        break
        return calls

    def busy_for_s(self) -> float:
        """Seconds the model thread has spent on its current batch; 0 while it waits for one. Any thread."""
        since = self._batch_since
        return 0.0 if since is None else time.monotonic() - since

    def _run_batch(self, calls: list[_Call]) -> None:
        """The forward of every request of ``calls`` as one batch; each call gets its share back, in order, as soon
        as its own requests are done (a request that runs alone does not wait for the others' forwards)."""
        items = [item for call in calls for item in call.items]
        owner = [c for c, call in enumerate(calls) for _ in call.items]
        results: list[Any] = list(items)
        left = [len(call.items) for call in calls]
        answered = [False] * len(calls)
        self._batch_since = time.monotonic()
        try:
            if self._on_batch is not None:
                self._on_batch(len(items))
            start = 0
            starts = []
            for call in calls:
                starts.append(start)
                start += len(call.items)
            for c, call in enumerate(calls):
                if not call.items:  # nothing to run: a call with no requests is answered with no outcomes
                    answered[c] = True
                    call.answer([])
            for indices, found in self.forward_groups(items):
                for i, result in zip(indices, found):
                    results[i] = result
                    left[owner[i]] -= 1
                for c in dict.fromkeys(owner[i] for i in indices):
                    if left[c] == 0 and not answered[c]:
                        answered[c] = True
                        calls[c].answer(results[starts[c] : starts[c] + len(calls[c].items)])
            if not all(answered):
                raise RuntimeError(f"the forward left {sum(left)} requests without a result")
        except (
            BaseException
        ) as e:  # forward isolates failures per item; this is a bug, and every caller must hear of it
            log.exception("batch failed")
            for call, done in zip(calls, answered):
                if not done:
                    call.answer(None, e)
        finally:
            self._batch_since = None


@dataclass(slots=True)
class _Routed:
    """A prepared request with the workflow that runs it (None: ``entry`` is already its failed ``Outcome``)."""

    workflow: Any
    entry: Any


@dataclass(eq=False)
class _Call:
    """One API worker's call, queued for the model thread."""

    items: list[Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Any]]
    alone: bool = False  # a batch of its own (``BatchRunner.infer_alone``)
    waiting: list[Any] = field(default_factory=list)  # its markers while queued (core/crash_records.py ``waiting``)
    queued: float = field(default_factory=time.monotonic)

    def answer(self, outcomes: list[Any] | None, error: BaseException | None = None) -> None:
        """From the model thread: settle the caller's future on its own loop."""
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping and nobody waits
            self.loop.call_soon_threadsafe(_settle, self.future, outcomes, error)


def _settle(future: asyncio.Future[list[Any]], outcomes: list[Any] | None, error: BaseException | None) -> None:
    if future.done():  # the caller gave up (timeout, disconnect)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outcomes)


class Drain:
    """Keeps the runner serving for a moment after SIGTERM, until the API workers have sent what they hold.

    BentoML's process manager sends SIGTERM to every worker at once. The runner's server would stop accepting
    connections at once, so requests that an API worker had received but not yet passed on would fail with 503
    although the operator asked for a graceful stop. Instead the runner hands the signal on to its server only once
    no call is running and none has arrived for ``idle_s``, or after ``max_s`` at most; calls still running by then are
    cancelled (SHUTDOWN_TIMEOUT_S bounds the whole shutdown, docs/reliability.md).
    """

    def __init__(self, idle_s: float = 0.5, max_s: float = 30.0) -> None:
        self.idle_s = idle_s
        self.max_s = max_s
        self._active = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._last = time.monotonic()

    def install(self) -> bool:
        """Wrap the server's SIGTERM handler; call in the worker's main thread after the server installed its own."""
        if threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return False

        def deferred(signum: int, frame: Any) -> None:
            threading.Thread(target=self._pass_on, args=(previous, signum, frame), daemon=True).start()

        signal.signal(signal.SIGTERM, deferred)
        return True

    def _pass_on(self, handler: Any, signum: int, frame: Any) -> None:
        deadline = time.monotonic() + self.max_s
        while time.monotonic() < deadline:
            with self._lock:
                idle = self._active == 0 and time.monotonic() - self._last >= self.idle_s
            if idle:
                break
            time.sleep(0.05)
        # A call that arrived just before the hand-over still gets the rest of the bound, and no more.
        bound_uvicorn(handler, max(1.0, deadline - time.monotonic()))
        handler(signum, frame)  # uvicorn's handler only sets flags its main loop polls
