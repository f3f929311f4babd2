"""Runs one batch of requests through a workflow: groups compatible items, isolates failures per item.

This is the only place that knows how a batch is formed and split; the runner service calls
``run_batch`` and nothing else.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from workflows.base import InferenceWorkflow
from workflows.errors import InputError, ModelError, ServiceError

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
    if not isinstance(workflow, InferenceWorkflow):
        return [_legacy_inference(workflow, data) for data in datas]

    outcomes: list[Outcome | None] = [None] * len(datas)
    groups: dict[Any, list[int]] = defaultdict(list)
    items: list[Any] = [None] * len(datas)
    for i, data in enumerate(datas):
        try:
            items[i] = workflow.preprocess(data)
            key = workflow.batch_key(items[i])
        except ServiceError as e:
            outcomes[i] = failed(e)
            continue
        except Exception as e:  # a workflow's own validation that raised something generic
            outcomes[i] = failed(InputError(_message(e)))
            continue
        groups[("alone", i) if key is None else ("key", key)].append(i)

    for (kind, _), members in groups.items():
        if kind == "alone":
            i = members[0]
            outcomes[i] = _run_alone(workflow, items[i])
            continue
        try:
            outputs = _run_group(workflow, [items[i] for i in members])
        except Exception as e:
            if len(members) > 1:
                log.info("batch of %d failed (%s); retrying item by item", len(members), _message(e))
                for i in members:
                    outcomes[i] = _run_one_of_group(workflow, items[i])
            else:
                outcomes[members[0]] = failed(_as_model_error(e))
            continue
        for i, output in zip(members, outputs):
            outcomes[i] = _postprocess(workflow, output)
    return outcomes  # type: ignore[return-value]


def _run_group(workflow: InferenceWorkflow, group: list[Any]) -> list[Any]:
    outputs = workflow.unbatch(workflow.run_model(workflow.batch(group)), group)
    if len(outputs) != len(group):
        raise ModelError(f"the model returned {len(outputs)} outputs for {len(group)} inputs")
    return outputs


def _run_one_of_group(workflow: InferenceWorkflow, item: Any) -> Outcome:
    try:
        [output] = _run_group(workflow, [item])
    except Exception as e:
        return failed(_as_model_error(e))
    return _postprocess(workflow, output)


def _run_alone(workflow: InferenceWorkflow, item: Any) -> Outcome:
    try:
        output = workflow.run_model(item)
    except Exception as e:
        return failed(_as_model_error(e))
    return _postprocess(workflow, output)


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
