"""How batches form and run: ``ModelThread`` forms them from the calls that queue; ``prepare``, ``run_prepared``
and ``finish`` (together ``run_batch``) take requests through a workflow: compatible items share a forward,
failures stay with their own item.

This is the only place that knows how a batch is formed and split; the runner service prepares each call, submits
it to a ``ModelThread`` and finishes what comes back, and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workflows.base import InferenceWorkflow
from workflows.errors import InputError, ModelError, Overloaded, ServiceError

log = logging.getLogger("workflows.batching")

Outcome = dict[str, Any]


def ok(body: Any) -> Outcome:
    return {"status": 200, "body": body}


def failed(error: BaseException) -> Outcome:
    status = error.status if isinstance(error, ServiceError) else 500
    return {"status": status, "description": _message(error)}


def _message(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # TorchScript wraps the real error in a traceback of the scripted code; its last line says what failed.
    return lines[-1] if "TorchScript" in lines[0] else lines[0]


def run_batch(workflow: Any, datas: list[Any]) -> list[Outcome]:
    """One outcome per request, in order; one bad request never fails another."""
    return finish(workflow, run_prepared(workflow, prepare(workflow, datas)))


# The three steps of run_batch, split so that only the forward needs the model's thread: the runner prepares and
# finishes its calls on its event loop while the model thread runs another batch (docs/performance.md, section 15).


@dataclass(slots=True)
class _Item:
    """A request that passed preprocess: its model input and batch key."""

    value: Any
    key: Any


@dataclass(slots=True)
class _Output:
    """A request's share of the model's output, before postprocess."""

    value: Any


def prepare(workflow: Any, datas: list[Any]) -> list[Any]:
    """Per request: an ``_Item`` ready for the model, or the outcome of its failed preprocess."""
    if not isinstance(workflow, InferenceWorkflow):
        return list(datas)  # a legacy workflow's inference() does it all, on the model thread
    prepared: list[Any] = []
    for data in datas:
        try:
            item = workflow.preprocess(data)
            prepared.append(_Item(item, workflow.batch_key(item)))
        except ServiceError as e:
            prepared.append(failed(e))
        except Exception as e:  # a workflow's own validation that raised something generic
            prepared.append(failed(InputError(_message(e))))
    return prepared


def run_prepared(workflow: Any, prepared: list[Any]) -> list[Any]:
    """On the model thread: per request, an ``_Output`` or an outcome; items with equal keys share a forward."""
    if not isinstance(workflow, InferenceWorkflow):
        return [_legacy_inference(workflow, data) for data in prepared]
    results = list(prepared)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, entry in enumerate(prepared):
        if isinstance(entry, _Item):
            groups[("alone", i) if entry.key is None else ("key", entry.key)].append(i)
    for (kind, _), members in groups.items():
        if kind == "alone":
            i = members[0]
            results[i] = _run_alone(workflow, prepared[i].value)
            continue
        try:
            outputs = _run_group(workflow, [prepared[i].value for i in members])
        except Exception as e:
            if len(members) > 1:
                log.info("batch of %d failed (%s); retrying item by item", len(members), _message(e))
                for i in members:
                    results[i] = _run_one_of_group(workflow, prepared[i].value)
            else:
                results[members[0]] = failed(_as_model_error(e))
            continue
        for i, output in zip(members, outputs):
            results[i] = _Output(output)
    return results


def finish(workflow: Any, results: list[Any]) -> list[Outcome]:
    """Per request, its outcome: the output postprocessed, or the failure it already is."""
    return [_postprocess(workflow, r.value) if isinstance(r, _Output) else r for r in results]


def _run_group(workflow: InferenceWorkflow, group: list[Any]) -> list[Any]:
    outputs = workflow.unbatch(workflow.run_model(workflow.batch(group)), group)
    if len(outputs) != len(group):
        raise ModelError(f"the model returned {len(outputs)} outputs for {len(group)} inputs")
    return outputs


def check_batch_of_two(workflow: InferenceWorkflow, item: Any, differ: Callable[[Any, Any], str | None]) -> str | None:
    """At start-up, in the runner process: why ``item`` (preprocessed, with a batch key) batched with a copy of itself
    does not get the answer it gets alone, or None when both copies do.

    A batch must never change an answer; a model that mixes the rows of a batch (a norm over dim 0, a sum over
    everything) or cannot take two rows fails this check. ``differ(alone, batched)`` says how two outputs differ
    (None: they agree). The solo run's errors propagate; the batch's become the reason.
    """
    [alone] = _run_group(workflow, [item])
    try:
        batched = _run_group(workflow, [item, item])
    except Exception as e:
        return f"the model failed on a batch of two copies of the warm-up input ({type(e).__name__}: {_message(e)})"
    for output in batched:
        difference = differ(alone, output)
        if difference is not None:
            return f"a batch of two copies of the warm-up input answered differently from one alone ({difference})"
    return None


def _run_one_of_group(workflow: InferenceWorkflow, item: Any) -> Any:
    try:
        [output] = _run_group(workflow, [item])
    except Exception as e:
        return failed(_as_model_error(e))
    return _Output(output)


def _run_alone(workflow: InferenceWorkflow, item: Any) -> Any:
    try:
        return _Output(workflow.run_model(item))
    except Exception as e:
        return failed(_as_model_error(e))


def _postprocess(workflow: InferenceWorkflow, output: Any) -> Outcome:
    try:
        return ok(workflow.postprocess(output))
    except ServiceError as e:
        return failed(e)
    except Exception as e:
        log.exception("postprocess failed")
        return failed(ServiceError(f"postprocess failed: {_message(e)}"))


def _legacy_inference(workflow: Any, data: Any) -> Outcome:
    try:
        return ok(workflow.inference(data))
    except Exception as e:
        return failed(_as_model_error(e))


def _as_model_error(error: BaseException) -> ServiceError:
    if isinstance(error, ServiceError):
        return error
    return ModelError(f"the model failed on this input: {_message(error)}")


@dataclass(eq=False)
class _Call:
    items: list[Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Any]]
    queued: float = field(default_factory=time.monotonic)

    def answer(self, outcomes: list[Any] | None, error: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping and nobody waits
            self.loop.call_soon_threadsafe(_settle, self.future, outcomes, error)


def _settle(future: asyncio.Future[list[Any]], outcomes: list[Any] | None, error: BaseException | None) -> None:
    if future.done():  # the caller gave up (timeout, disconnect)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(outcomes)


class ModelThread:
    """The model's own thread: one batch after another, each made of every call that queued meanwhile.

    A lone call starts at once; calls that arrive while the model is busy queue and form the next batch (up to
    ``max_items`` requests), which the thread takes the moment the previous one ends. Nothing waits for the event
    loop between batches, which with BentoML's dispatcher left the model idle for 2.5-4.6 ms per batch
    (docs/performance.md, section 11). A call that waited longer than ``max_wait_s`` is answered 503 instead of run.
    """

    def __init__(self, run: Callable[[list[Any]], list[Outcome]], max_items: int, max_wait_s: float) -> None:
        self._run = run
        self._max_items = max_items
        self._max_wait_s = max_wait_s
        self._calls: deque[_Call] = deque()
        self._queued = threading.Condition()
        self._thread = threading.Thread(target=self._serve, name="model", daemon=True)
        self._thread.start()

    async def submit(self, items: list[Any]) -> list[Outcome]:
        """One result per item, in order (see ``run_prepared``)."""
        loop = asyncio.get_running_loop()
        call = _Call(items, loop, loop.create_future())
        with self._queued:
            self._calls.append(call)
            self._queued.notify()
        return await call.future

    def _serve(self) -> None:
        while True:
            calls = self._next_batch()
            started = time.monotonic()
            ready: list[_Call] = []
            for call in calls:
                waited = started - call.queued
                if waited <= self._max_wait_s:
                    ready.append(call)
                    continue
                error = Overloaded(f"the model is overloaded: waited {waited:.1f} s for it (MAX_LATENCY_MS); retry")
                call.answer([failed(error)] * len(call.items))
            if ready:
                self._run_calls(ready)

    def _next_batch(self) -> list[_Call]:
        with self._queued:
            while not self._calls:
                self._queued.wait()
            calls: list[_Call] = []
            size = 0
            while self._calls and (not calls or size + len(self._calls[0].items) <= self._max_items):
                call = self._calls.popleft()
                if not call.future.done():  # a caller that gave up is not run
                    calls.append(call)
                    size += len(call.items)
        return calls

    def _run_calls(self, calls: list[_Call]) -> None:
        try:
            outcomes = self._run([item for call in calls for item in call.items])
        except BaseException as e:  # run_prepared isolates failures; this is a bug, and every caller must hear of it
            log.exception("batch failed")
            for call in calls:
                call.answer(None, e)
            return
        start = 0
        for call in calls:
            call.answer(outcomes[start : start + len(call.items)])
            start += len(call.items)
