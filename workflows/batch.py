"""What a batch means for a workflow, in three steps, each one request per entry and in order:

    preprocess_all(workflow, requests)  -> prepared   per request: the model's input and batch key, or its failure
    forward_all(workflow, prepared)     -> forwarded  items with equal keys share one forward; failures stay per item
    postprocess_all(workflow, forwarded) -> outcomes  per request: its ``Outcome`` (core/outcome.py)

``run_batch`` chains them in the caller's thread: a user's unit test of a workflow needs no server. The runner
(runner/batch_runner.py) runs the same steps, only ``forward_all`` on the model's thread.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.errors import InputError, ModelError, ServiceError, first_line
from core.outcome import Outcome, answer, failure
from workflows.base import InferenceWorkflow, uses_hooks

log = logging.getLogger("workflows.batch")


def run_batch(workflow: Any, requests: list[Any]) -> list[Outcome]:
    """One ``Outcome`` per request's data, in order, in the calling thread; one bad request never fails another.

    ``workflow``: an ``InferenceWorkflow`` after its ``setup()`` (or a class with ``inference()``). Example::

        [outcome] = run_batch(workflow, [{"dtype": "float", "values": [[1.0, 2.0]]}])
        assert outcome.status == 200, outcome.description
    """
    return postprocess_all(workflow, forward_all(workflow, preprocess_all(workflow, requests)))


@dataclass(slots=True)
class _Item:
    """A request that passed preprocess: its model input and batch key."""

    value: Any
    key: Any


@dataclass(slots=True)
class _Output:
    """A request's share of the model's output, before postprocess."""

    value: Any


def preprocess_all(workflow: Any, requests: list[Any]) -> list[Any]:
    """Per request: an ``_Item`` ready for the model, or the ``Outcome`` of its failed preprocess (400 unless it
    raised a ``ServiceError`` of another status)."""
    if not uses_hooks(workflow):
        return list(requests)  # a legacy workflow's inference() does it all, on the model thread
    prepared: list[Any] = []
    for data in requests:
        try:
            item = workflow.preprocess(data)
            prepared.append(_Item(item, workflow.batch_key(item)))
        except ServiceError as e:
            prepared.append(failure(e))
        except Exception as e:  # a workflow's own validation that raised something generic
            prepared.append(failure(InputError(first_line(e))))
    return prepared


def forward_all(workflow: Any, prepared: list[Any]) -> list[Any]:
    """Per request, an ``_Output`` or an ``Outcome`` (422 for a model that raised); items with equal keys share a
    forward, and a shared forward that fails runs again item by item. The runner calls it on the model's thread."""
    if not uses_hooks(workflow):
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
                log.info("batch of %d failed (%s); retrying item by item", len(members), first_line(e))
                for i in members:
                    results[i] = _run_one_of_group(workflow, prepared[i].value)
            else:
                results[members[0]] = failure(_as_model_error(e))
            continue
        for i, output in zip(members, outputs):
            results[i] = _Output(output)
    return results


def postprocess_all(workflow: Any, results: list[Any]) -> list[Outcome]:
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
        return f"the model failed on a batch of two copies of the warm-up input ({type(e).__name__}: {first_line(e)})"
    for output in batched:
        difference = differ(alone, output)
        if difference is not None:
            return f"a batch of two copies of the warm-up input answered differently from one alone ({difference})"
    return None


def _run_one_of_group(workflow: InferenceWorkflow, item: Any) -> Any:
    try:
        [output] = _run_group(workflow, [item])
    except Exception as e:
        return failure(_as_model_error(e))
    return _Output(output)


def _run_alone(workflow: InferenceWorkflow, item: Any) -> Any:
    try:
        return _Output(workflow.run_model(item))
    except Exception as e:
        return failure(_as_model_error(e))


def _postprocess(workflow: InferenceWorkflow, output: Any) -> Outcome:
    try:
        return answer(workflow.postprocess(output))
    except ServiceError as e:
        return failure(e)
    except Exception as e:
        log.exception("postprocess failed")
        return failure(ServiceError(f"postprocess failed: {first_line(e)}"))


def _legacy_inference(workflow: Any, data: Any) -> Outcome:
    try:
        return answer(workflow.inference(data))
    except Exception as e:
        return failure(_as_model_error(e))


def _as_model_error(error: BaseException) -> ServiceError:
    if isinstance(error, ServiceError):
        return error
    return ModelError(f"the model failed on this input: {first_line(error)}")
