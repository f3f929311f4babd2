"""The workflow contract: one small class whose hooks follow the data.

    setup()                      once, before the first request: load the model
    warmup() -> bool             once, after setup: run a sample so the first request pays no lazy start-up
    preprocess(data) -> item     one request's ``data`` -> model input (raise InputError on bad data)
    batch_key(item) -> key       items with equal keys may share one forward; None runs the item alone
    batch(items) -> batch        combine items that share a key
    run_model(batch) -> output   the forward pass
    unbatch(output, items)       split a batch's output back, one entry per item
    postprocess(output) -> JSON  one item's output -> what the client receives
    describe() -> dict           what ``GET /info`` shows about the model
    describe_input(item) -> str  what the 422 of a model that raised on ``item`` adds: its shape, what the model expects

Which thread: the runner process calls ``batch``, ``run_model`` and ``unbatch`` on the model's own thread, one batch
after another, and ``preprocess``, ``batch_key`` and ``postprocess`` on its event loop, alongside the forward of
another batch: keep those short, and keep them off state that ``run_model`` changes. ``setup``, ``warmup`` and
``describe`` run in the runner process before it takes requests (``describe`` again on ``GET /info``).

Which status (``forward_all`` and its siblings below apply it; core/errors.py ``failure`` turns an exception into
the status):

    preprocess, batch_key          ServiceError subclasses: their own status; any other exception: 400 (InputError)
    batch, run_model, unbatch      ServiceError subclasses: their own status; any other exception: 422 (ModelError)
    postprocess                    ServiceError subclasses: their own status; any other exception: 500
    inference (classes without the hooks)   as run_model

A ``ModelError`` or other exception that is no ``InputError`` from ``preprocess`` or ``batch_key``, and a
``ModelError`` or ``InputError`` from the forward's hooks, get the input's shape and dtype after their first line
(``describe_input`` for the forward, the request's tensors as sent for ``preprocess``), as the service's own checks
do; never the values. ``/service_output`` and ``/v2`` both run every hook (docs/contract.md).

A failing shared forward runs again item by item, so only the requests that fail get the error.

The rule batching keeps: a request's answer is the same whether it ran alone or in a batch. ``batch_key`` must
therefore return None unless the item's leading axis is a batch axis by construction, and ``run_model`` must treat
the rows of a batch independently. ``InferenceWorkflow``'s key is always None (every item runs alone);
``TensorWorkflow`` batches torch tensors of rank >= 2 with equal dtype and trailing shape, so a tensor workflow
needs only ``setup`` and ``run_model``.

``inference(data)`` chains the hooks for a single request, as the original library's workflows did. Classes that
only define ``setup()`` and ``inference()`` (no base class) are served too, one request at a time.

Mistakes in a subclass (no ``run_model``, a hook with the wrong parameters, ``batch`` without ``unbatch``) raise
StartupError when the class is defined or built, with the fix in the message.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import types
import typing
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from core.errors import InputError, ModelError, Outcome, ServiceError, StartupError, answer, failure, first_line
from core.model_call import UNASKED, asked_outputs
from core.tensor_values import VALUES_NEEDED, SentTensor
from core.terms import DTYPE_NAMES, MAX_RANK, json_text

if TYPE_CHECKING:
    import torch

    from workflows import tensors

log = logging.getLogger("workflows.base")

DataT = TypeVar("DataT")  # one request's OFFCHAIN ``data``, as JSON decoded it
ItemT = TypeVar("ItemT")  # one request's model input, what ``preprocess`` returns
BatchT = TypeVar("BatchT")  # what ``batch`` makes of the items that share a key, and ``run_model`` takes
OutputT = TypeVar("OutputT")  # what ``run_model`` returns for a batch (or a lone item), and ``unbatch`` splits

# hook -> (its parameters after self, how a correct definition reads): checked on every subclass at definition.
_HOOKS = {
    "setup": ((), "def setup(self): self.model = ..."),
    "warmup": ((), "def warmup(self): self.run_model(...); return True"),
    "preprocess": (("data",), "def preprocess(self, data): return torch.tensor(data['rows'])"),
    "batch_key": (("item",), "def batch_key(self, item): return tuple(item.shape[1:])"),
    "batch": (("items",), "def batch(self, items): return torch.cat(list(items))"),
    "run_model": (("batch",), "def run_model(self, batch): return self.model(batch)"),
    "unbatch": (("output", "items"), "def unbatch(self, output, items): return list(output.split(...))"),
    "postprocess": (("output",), "def postprocess(self, output): return output.tolist()"),
    "describe": ((), "def describe(self): return {'name': ...}"),
    "describe_input": (("item",), "def describe_input(self, item): return f'the input had shape {list(item.shape)}'"),
    "inference": (("data",), "def inference(self, data): return self.model(data)"),
}


def _check_arity(cls: type, name: str, params: tuple[str, ...], example: str) -> None:
    hook = cls.__dict__.get(name)
    if not inspect.isfunction(hook):
        return  # inherited, or a staticmethod/property a reader of the class chose knowingly
    try:
        inspect.signature(hook).bind(None, *params)
    except TypeError:
        wanted = ", ".join(("self", *params))
        raise StartupError(
            f"{cls.__name__}.{name}{inspect.signature(hook)}: the runner calls {name}({wanted}); "
            f"define it as: {example}"
        ) from None


class InferenceWorkflow(Generic[DataT, ItemT, BatchT, OutputT]):
    """Subclass it, define ``setup`` and ``run_model``, and the other hooks where the defaults do not fit.

    The defaults: ``preprocess`` and ``postprocess`` pass the value through, every item runs alone (``batch_key``
    None), ``warmup`` does nothing. Type parameters, for a checker and a reader: ``InferenceWorkflow[DataT, ItemT,
    BatchT, OutputT]`` (see the TypeVars above).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, (params, example) in _HOOKS.items():
            _check_arity(cls, name, params, example)

    def __new__(cls, *args: Any, **kwargs: Any) -> InferenceWorkflow[Any, Any, Any, Any]:
        # Here rather than in __init__: subclasses define their own __init__ without calling super().
        _check_complete(cls)
        if (args or kwargs) and cls.__init__ is object.__init__:
            # Python checks excess arguments only when neither __new__ nor __init__ is overridden: without this, a
            # class with no __init__ of its own would silently drop every argument (CLASSIC_INF_WORKFLOW_KW_ARGS).
            raise TypeError(f"{cls.__name__}() takes no arguments")
        return super().__new__(cls)

    def setup(self) -> None:
        """Load the model. Runner process, once, before any other hook; an exception stops start-up.

        Correct: ``self.model = torch.jit.load(path).eval()``. Incorrect: loading in ``__init__`` (the class is
        also built in processes that never serve) or in ``run_model`` (the first request pays for it)."""

    def warmup(self) -> bool:
        """Run a sample through the model so the first request pays no lazy initialisation; True when it ran.
        Runner process, once, after ``setup``, before the service reports ready. Raise StartupError to stop
        start-up (the model cannot answer its own sample). The default does nothing and returns False.

        Correct: ``self.run_model(self.preprocess(SAMPLE)); return True``. Incorrect: returning None (read as
        "skipped") after running the sample."""
        return False

    def preprocess(self, data: DataT) -> ItemT:
        """One request's ``data`` (JSON: dict, list, str, number) -> the model's input for it. Runner event loop,
        per request. InputError (or any exception that is no ServiceError) -> 400 with its first line. A class that
        defines its own ``preprocess`` always gets the JSON ``data``; the built-in ones (``TensorWorkflow``'s,
        ``TorchInferenceWorkflow``'s) may instead get the request's tensor as an API worker decoded it
        (``core.tensor_values.SentTensor``; ``takes_sent_tensors``).

        Correct: ``return torch.tensor(data["rows"], dtype=torch.float32)  # (n, 4)``. Incorrect: running the
        model here (it would block the event loop while the model thread waits)."""
        return data  # type: ignore[return-value]

    def batch_key(self, item: ItemT) -> Hashable | None:
        """Items with equal keys may share one forward; None runs the item alone (the default). Runner event
        loop, per request, right after ``preprocess``; exceptions as in ``preprocess`` (400).

        Correct: ``return (item.dtype, tuple(item.shape[1:])) if item.dim() >= 2 else None`` for an (n, ...)
        item whose dim 0 is a batch axis. Incorrect: a key for a (C, H, W) image: its dim 0 is channels, and two
        images concatenated would become one with 2C channels."""
        return None

    def batch(self, items: Sequence[ItemT]) -> BatchT:
        """The items that share a key (in request order, at least one) -> one model input. Model thread; an
        exception -> 422 for the batch's requests, each then run alone. Define ``unbatch`` with it.

        Correct: ``return torch.cat(list(items))`` ((n1, 4), (n2, 4) -> (n1 + n2, 4)). Incorrect:
        ``torch.stack(items)`` on items of different lengths (it raises), or padding that changes the answers."""
        return list(items)  # type: ignore[return-value]

    def run_model(self, batch: BatchT) -> OutputT:
        """The forward pass: a ``batch`` (or a lone item, when its key is None) -> the model's output. Model
        thread, one call at a time. Any exception that is no ServiceError -> 422 with its first line.

        Correct: ``with torch.inference_mode(): return self.model(batch)``. Incorrect: a norm or softmax over dim 0
        (a request's answer would depend on its neighbours in the batch)."""
        raise NotImplementedError(f"{type(self).__name__} must implement run_model()")

    def unbatch(self, output: OutputT, items: Sequence[ItemT]) -> list[Any]:
        """A batch's output -> one output per item, in the items' order (same count, else 422). Model thread;
        exceptions as in ``run_model`` (422).

        Correct: ``return list(output.split([len(i) for i in items]))`` ((n1 + n2, 2) -> (n1, 2), (n2, 2)).
        Incorrect: ``list(output)`` when an item has several rows (one entry per row, not per item)."""
        return list(output)  # type: ignore[call-overload]

    def postprocess(self, output: Any) -> Any:
        """One item's output -> what the client receives (JSON-serialisable). Runner event loop, per request.
        A ServiceError -> its status; any other exception -> 500.

        Correct: ``return output.tolist()``. Incorrect: returning a tensor or a set (not JSON: the answer fails)."""
        return output

    def describe(self) -> dict[str, Any]:
        """What ``GET /info`` shows under ``model`` (JSON-serialisable). Runner process, after ``warmup`` and on
        each ``GET /info``: keep it cheap. Correct: ``return {"name": "scaler", "features": 4}``; incorrect:
        returning the model object (not JSON)."""
        return {}

    def describe_input(self, item: ItemT) -> str | None:
        """What the 422 of a model that raised on ``item`` says after the model's own words (None: nothing): the
        input as the model got it and, where the workflow knows it, the input the model expects, so the client sees
        the fix (``the input had shape [4] float; the model was warmed up with shape [1, 4] float``). Model thread,
        only after ``run_model`` raised; an exception here is ignored (the 422 keeps the model's words alone).

        Correct: ``return f"the input had shape {list(item.shape)}"``. Incorrect: naming the model file's path (the
        client may be anyone)."""
        return None

    def inference(self, data: DataT) -> Any:
        """One request through every hook in the calling thread, as the original library's workflows did; a
        class without the other hooks may define only this (then each request runs alone, on the model thread,
        statuses as in ``run_model``)."""
        item = self.preprocess(data)
        if self.batch_key(item) is None:
            return self.postprocess(self.run_model(item))  # type: ignore[arg-type]
        [output] = self.unbatch(self.run_model(self.batch([item])), [item])
        return self.postprocess(output)


class TensorWorkflow(InferenceWorkflow[DataT, "torch.Tensor", "torch.Tensor", OutputT]):
    """A workflow whose items are torch tensors with a batch axis: define ``setup`` and ``run_model``; requests of
    rank >= 2 with equal dtype and trailing shape share a forward, concatenated on dim 0.

    Defaults: ``preprocess`` decodes the contract's tensor (``{"dtype", "shape"?, "values"}``, at most
    ``max_elements`` values and never more than MAX_REQUEST_ELEMENTS; workflows/tensors.py; on the default path an
    API worker has decoded it already and it arrives as a ``SentTensor``), ``postprocess`` encodes
    tensors back the same way (containers walked). Set ``batching = False`` (class or instance) to run every request
    alone. torch is imported when the first one is built (``_import_torch``), not with the module.
    """

    batching: bool = True
    max_elements: int | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> InferenceWorkflow[Any, Any, Any, Any]:
        _import_torch()
        return super().__new__(cls, *args, **kwargs)

    def preprocess(self, data: DataT) -> torch.Tensor:
        return tensors.decode(data, self.max_elements)

    preprocess.takes_sent_tensors = True  # type: ignore[attr-defined]  # decode takes a SentTensor as it is

    def batch_key(self, item: torch.Tensor) -> Hashable | None:
        """(dtype, trailing shape) for a rank >= 2 tensor, else None. A rank-0/1 item's only axis is its features
        (softmax over [1, 2, 3] must not become softmax over two requests' values), so it runs alone."""
        if not self.batching or not isinstance(item, torch.Tensor) or item.dim() < 2:
            return None
        return (item.dtype, tuple(item.shape[1:]))

    def batch(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        """Items concatenated on dim 0: (n1, ...), (n2, ...) -> (n1 + n2, ...)."""
        return items[0] if len(items) == 1 else torch.cat(list(items))

    def unbatch(self, output: Any, items: Sequence[torch.Tensor]) -> list[Any]:
        """The output split on dim 0 by the items' leading sizes; ModelError (422) when it does not split so."""
        if len(items) == 1:
            return [output]
        sizes = [item.shape[0] for item in items]
        if not isinstance(output, torch.Tensor) or output.dim() == 0 or output.shape[0] != sum(sizes):
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ModelError(f"output {got} does not split into {len(items)} items of leading sizes {sizes}")
        return list(torch.split(output, sizes))

    def postprocess(self, output: Any) -> Any:
        return tensors.encode_output(output)

    postprocess.passes_unasked = True  # type: ignore[attr-defined]  # encode_output leaves an Unasked as it is

    # The input a model's forward is known to take, for ``describe_input``: (how it is known, e.g. "warmed up with",
    # its shape (None or a name: any size), its dtype name). A workflow sets it when it learns it.
    expected_input: tuple[str, list[int | str | None], str | None] | None = None

    def describe_input(self, item: torch.Tensor) -> str | None:
        """The item's shape and dtype and, when ``expected_input`` is known, that input and the fix (``input_note``)."""
        if not isinstance(item, torch.Tensor):
            return None
        return input_note(list(item.shape), tensors.NAMES.get(item.dtype, str(item.dtype)), self.expected_input)


def _import_torch() -> None:
    """Bind torch and the tensor codec for ``TensorWorkflow``'s hooks, once, when the first one is built: importing
    ``workflows`` must not import torch (the API workers' tests check it), and an import statement inside each hook
    ran on every request (~1-2 µs in all; docs/performance.md, section 21)."""
    global tensors, torch
    import torch

    from workflows import tensors


def input_note(
    shape: list[int], dtype: str, expected: tuple[str, list[int | str | None], str | None] | None = None
) -> str:
    """``the input had shape [4] float``, and with ``expected`` (how known, shape, dtype; see
    ``TensorWorkflow.expected_input``) what the model takes: ``; the model was warmed up with shape [1, 4] float
    (batch first)``, and for an input that lacks only the batch axis the fix, ``; to send one row, send shape [1, 4]
    (a batch of one)``. Any thread; raises nothing."""
    note = f"the input had shape {_shown(shape)} {dtype}"
    if expected is None:
        return note
    how, wanted, wanted_dtype = expected
    note += f"; the model was {how} shape {_shown(wanted)}" + (f" {wanted_dtype}" if wanted_dtype else "")
    if len(wanted) < 2:
        return note
    note += " (batch first)"
    trailing = wanted[1:]
    if len(shape) == len(trailing) and all(not isinstance(w, int) or w == n for w, n in zip(trailing, shape)):
        note += f"; to send one row, send shape {_shown([1, *shape])} (a batch of one)"
    return note


def _shown(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"


def uses_hooks(workflow: Any) -> bool:
    """Whether the batch steps call ``workflow``'s hooks: an InferenceWorkflow with its own ``run_model``. One that
    only overrides ``inference`` runs it whole, as a class without a base does."""
    return isinstance(workflow, InferenceWorkflow) and not (
        type(workflow).run_model is InferenceWorkflow.run_model
        and type(workflow).inference is not InferenceWorkflow.inference
    )


def _check_complete(cls: type) -> None:
    if cls.run_model is InferenceWorkflow.run_model and cls.inference is InferenceWorkflow.inference:
        raise StartupError(
            f"{cls.__name__} defines neither run_model nor inference: add "
            f"'def run_model(self, batch): return self.model(batch)' (and load self.model in setup)"
        )
    defaults = (InferenceWorkflow, TensorWorkflow)
    if not any(cls.batch is d.batch for d in defaults) and any(cls.unbatch is d.unbatch for d in defaults):
        raise StartupError(
            f"{cls.__name__} overrides batch but not unbatch: the default unbatch cannot know how your batch "
            f"was built; add 'def unbatch(self, output, items): ...' returning one output per item"
        )


def check_kwargs(init: Callable[..., None], arguments: dict[str, Any], positive: tuple[str, ...] = ()) -> None:
    """The built-in workflows' KW_ARGS against their constructor's annotations, at construction (any process).

    KW_ARGS come from JSON, where the string "false" would count as true and 1.5 would pass for a thread count: a value
    of another JSON type than a parameter's annotation allows raises StartupError naming the key, the types allowed
    and the value, e.g. ``use_jit: expected true or false, got "false"``. Parameters annotated with anything but JSON
    types (``bool``, ``int``, ``float``, ``str``, ``dict``, ``list``, ``None`` and unions of them) are not checked.
    The integers named in ``positive`` must be at least 1 when given (0 threads would silently mean the default).
    """
    hints = typing.get_type_hints(init)
    for name, value in arguments.items():
        allowed = _json_types(hints.get(name))
        if allowed and not _is_one_of(value, allowed):
            expected = " or ".join(dict.fromkeys(_JSON_TYPE_NAMES[t] for t in allowed))
            sent = json.dumps(value, default=repr)
            sent = sent if len(sent) <= 60 else sent[:57] + "..."
            raise StartupError(f"CLASSIC_INF_WORKFLOW_KW_ARGS: {name}: expected {expected}, got {sent}")
        if name in positive and isinstance(value, int) and value < 1:
            raise StartupError(f"CLASSIC_INF_WORKFLOW_KW_ARGS: {name}: expected an integer >= 1, got {value}")


_JSON_TYPE_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "an object",
    list: "an array",
    type(None): "null",
}


def _json_types(hint: Any) -> tuple[type, ...] | None:
    """The Python types of JSON values that ``hint`` allows, or None when it is no JSON type (not checked)."""
    if hint is None:
        return None
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_json_types(part) for part in typing.get_args(hint)]
        return None if any(part is None for part in parts) else tuple(t for part in parts for t in part)  # type: ignore[union-attr]
    base = typing.get_origin(hint) or hint
    return (base,) if base in _JSON_TYPE_NAMES else None


def _is_one_of(value: Any, allowed: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, not to JSON
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, allowed)


# How a batch runs through the hooks.
#
# What a batch means for a workflow, in three steps, each one request per entry and in order:
#
#     preprocess_all(workflow, requests)  -> prepared   per request: the model's input and batch key, or its failure
#     forward_all(workflow, prepared)     -> forwarded  items with equal keys share one forward; failures stay per item
#     postprocess_all(workflow, forwarded) -> outcomes  per request: its ``Outcome`` (core/errors.py)
#
# ``run_batch`` chains them in the caller's thread: a user's unit test of a workflow needs no server. The runner
# (runner/batch_runner.py) runs the same steps, only ``forward_all`` on the model's thread.


def run_batch(workflow: Any, requests: list[Any]) -> list[Outcome]:
    """One ``Outcome`` per request's data, in order, in the calling thread; one bad request never fails another.

    ``workflow``: an ``InferenceWorkflow`` after its ``setup()`` (or a class with ``inference()``). Example::

        [outcome] = run_batch(workflow, [{"dtype": "float", "values": [[1.0, 2.0]]}])
        assert outcome.status == 200, outcome.description
    """
    return postprocess_all(workflow, forward_all(workflow, preprocess_all(workflow, requests)), requests)


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
    raised a ``ServiceError`` of another status). A request's ``AskedFor`` (core/model_call.py) is its data here;
    ``postprocess_all`` reads the outputs it asks for."""
    if not uses_hooks(workflow):
        # A legacy workflow's inference() does it all, on the model thread.
        return [asked_outputs(request)[1] for request in requests]
    prepared: list[Any] = []
    for request in requests:
        _, data = asked_outputs(request)
        try:
            item = workflow.preprocess(data)
            key = workflow.batch_key(item)
            hash(key)  # an unhashable key (a list) fails its own request here, not the batch it would group in
            prepared.append(_Item(item, key))
        except _RAISED_ON_THE_LOOP as e:
            if type(data) is SentTensor:  # the API worker sends the data as written: the message names its values
                prepared.append(VALUES_NEEDED)
            elif isinstance(e, InputError):  # the decoder's (or the workflow's) own words about the data
                prepared.append(failure(e))
            else:  # ModelError, or something generic: the workflow's own check of the input
                prepared.append(_failed_on_request(e, data))
    return prepared


def takes_sent_tensors(workflow: Any) -> bool:
    """Whether ``workflow``'s ``preprocess`` takes a request's tensor as an API worker decoded it (a
    ``core.tensor_values.SentTensor``) as well as its JSON data: the built-in ones, marked ``takes_sent_tensors``
    (``TensorWorkflow``'s and ``TorchInferenceWorkflow``'s), and no workflow that overrides them. The runner says so
    to the API workers (service.py), which then send such tensors on the default path."""
    return uses_hooks(workflow) and getattr(type(workflow).preprocess, "takes_sent_tensors", False) is True


def forward_all(workflow: Any, prepared: list[Any]) -> list[Any]:
    """Per request, an ``_Output`` or an ``Outcome`` (422 for a model that raised): ``forward_groups``, all at once.
    The runner calls it on the model's thread."""
    results = list(prepared)
    for indices, found in forward_groups(workflow, prepared):
        for i, result in zip(indices, found):
            results[i] = result
    return results


def forward_groups(workflow: Any, prepared: list[Any]) -> Iterator[tuple[list[int], list[Any]]]:
    """Yields (indices, results): each request's index once, as soon as its result (an ``_Output``, or an ``Outcome``)
    is known, the requests that failed before the model first. Items with equal keys share a forward, and a shared
    forward that fails runs again item by item. On the model's thread; the runner answers a call the moment its
    requests are done, so a request that runs alone does not wait for the forwards of the others."""
    if not uses_hooks(workflow):
        for i, data in enumerate(prepared):
            yield [i], [_legacy_inference(workflow, data)]
        return
    groups: dict[Any, list[int]] = defaultdict(list)
    failed: list[int] = []
    for i, entry in enumerate(prepared):
        if isinstance(entry, _Item):
            groups[("alone", i) if entry.key is None else ("key", entry.key)].append(i)
        else:
            failed.append(i)
    if failed:
        yield failed, [prepared[i] for i in failed]
    for (kind, _), members in groups.items():
        if kind == "alone":
            i = members[0]
            yield members, [_run_alone(workflow, prepared[i].value)]
            continue
        try:
            outputs = _run_group(workflow, [prepared[i].value for i in members])
        except _RAISED_BY_MODEL as e:
            if len(members) > 1:
                log.info("batch of %d failed (%s); retrying item by item", len(members), first_line(e))
                for i in members:
                    yield [i], [_run_one_of_group(workflow, prepared[i].value)]
            else:
                yield members, [failure(_as_model_error(e, workflow, prepared[members[0]].value))]
            continue
        yield members, [_Output(output) for output in outputs]


def postprocess_all(workflow: Any, results: list[Any], requests: list[Any] | None = None) -> list[Outcome]:
    """Per request, its outcome: the output postprocessed, or the failure it already is. ``requests`` (those of
    ``preprocess_all``, in order): a request that asks for some outputs only (``AskedFor``) gets the others as
    ``Unasked`` places, never encoded nor checked, when the workflow's ``postprocess`` passes them through (marked
    ``passes_unasked``: TensorWorkflow's and the ONNX workflow's); any other ``postprocess`` sees the whole output."""
    if requests is None or not getattr(getattr(type(workflow), "postprocess", None), "passes_unasked", False):
        return [_postprocess(workflow, r.value) if isinstance(r, _Output) else r for r in results]
    return [
        _postprocess(workflow, _only_asked(r.value, asked_outputs(request)[0])) if isinstance(r, _Output) else r
        for r, request in zip(results, requests, strict=True)
    ]


def _only_asked(output: Any, asked: tuple[str, ...] | None, name: str = "") -> Any:
    """``output`` with each part not in ``asked`` replaced by ``UNASKED``, its parts named as the Open Inference
    Protocol names them (public/open_inference.py ``output_tensors``): ``output_0`` for a lone output or a list's (a
    tuple's) items, a dict's keys, joined with "." when nested. Tuples become lists, as the encoder makes them."""
    if asked is None:
        return output
    if isinstance(output, dict):
        return {key: _only_asked(value, asked, f"{name}.{key}" if name else str(key)) for key, value in output.items()}
    if isinstance(output, (list, tuple)):
        return [
            _only_asked(value, asked, f"{name}.{index}" if name else f"output_{index}")
            for index, value in enumerate(output)
        ]
    return output if (name or "output_0") in asked else UNASKED


def _run_group(workflow: InferenceWorkflow, group: list[Any]) -> list[Any]:
    outputs = workflow.unbatch(workflow.run_model(workflow.batch(group)), group)
    if len(outputs) != len(group):
        raise ModelError(f"the model returned {len(outputs)} outputs for {len(group)} inputs")
    return outputs


def check_batch(
    workflow: InferenceWorkflow,
    item: Any,
    differ: Callable[[Any, Any], str | None],
    variants: Callable[[Any], list[tuple[Any, str]]],
    first: str = "the warm-up input",
) -> tuple[str | None, str]:
    """In the runner process, on the thread that runs the model: whether ``item`` (preprocessed, with a batch key),
    batched with different inputs, gets the answer each gets alone. ``first`` names ``item`` in the reason. Returns
    (why not, or None; what the batch held, for the reason shown).

    A batch must never change an answer; a model that mixes the rows of a batch (a norm over dim 0, a sum over
    everything) or cannot take several rows fails this check. The other inputs are ``variants(item)``, each (input,
    how it was made), all in one batch with ``item``: two copies would hide a model that subtracts the batch's mean,
    and one variant that a per-row symmetry maps back to the input (a sum or a sort of values reversed) would too;
    the batch passes only if every input answers as alone. A variant the model refuses alone is left out; with none
    left, two copies are checked. ``differ(alone, batched)`` says how two outputs differ (None: they agree). The
    solo run's errors propagate; the batch's become the reason.
    """
    # Every run gets fresh copies: a model that changes its input in place (x.sub_(1), x /= 255) would otherwise
    # change the next run's input, and the request's own tensor when a request's input is the one checked.
    [alone] = _run_group(workflow, [_fresh(item)])
    inputs, expected, hows = [item], [alone], []
    for other, how in variants(item):
        try:
            [other_alone] = _run_group(workflow, [_fresh(other)])
        except Exception:  # a variant the model refuses is no input a request could send it: left out
            continue
        inputs.append(other)
        expected.append(other_alone)
        hows.append(how)
    if hows:
        what = f"{first} and {'a variant' if len(hows) == 1 else 'variants'} of it ({'; '.join(hows)})"
    else:
        what = f"two copies of {first}"
        inputs, expected = [item, item], [alone, alone]
    try:
        batched = _run_group(workflow, [_fresh(each) for each in inputs])
    except Exception as e:
        return f"the model failed on a batch of {what} ({type(e).__name__}: {first_line(e)})", what
    for solo, output in zip(expected, batched):
        difference = differ(solo, output)
        if difference is not None:
            return f"a batch of {what} answered differently from each alone ({difference})", what
    return None, what


def _fresh(item: Any) -> Any:
    """A copy of a tensor input for one run of the batching check (the item itself for other kinds of input)."""
    clone = getattr(item, "clone", None)
    return clone() if callable(clone) else item


def record_batch_check(
    workflow: Any,
    item: Any,
    differ: Callable[[Any, Any], str | None],
    variants: Callable[[Any], list[tuple[Any, str]]],
    first: str = "the warm-up input",
) -> None:
    """``check_batch``, and its outcome kept on ``workflow``: batching turned off when the check fails, and
    ``workflow.info["batching"]`` (what ``describe()`` shows) says which and why. Same thread and errors as
    ``check_batch``."""
    problem, checked_with = check_batch(workflow, item, differ, variants, first)
    if problem is None:
        reason = f"a batch of {checked_with} gave each the answer it gets alone"
        workflow.info["batching"] = {"enabled": True, "checked": True, "reason": reason}
    else:
        workflow.batching = False
        workflow.info["batching"] = {"enabled": False, "checked": True, "reason": f"{problem}; each request runs alone"}


def check_on_first_request(workflow: Any, prepared: list[Any]) -> list[Any]:
    """On the model thread, before ``forward_groups``: ``prepared`` as it may be forwarded. A per-request model
    (workflows/per_request.py) has no warm-up input, so while its ``batching_check_pending`` is true the first
    request that could share a forward is checked first (its workflow's ``check_batching``, the start-up check with
    that request's input), and until a check has passed nothing shares a forward. Whenever the workflow's batching
    is off (the check failed, or the model fails on that input alone: the next request checks), every item runs
    alone, also those keyed before the check turned it off. Raises nothing: a failed check is logged."""
    if getattr(workflow, "batching_check_pending", False):
        first = next((e for e in prepared if isinstance(e, _Item) and e.key is not None), None)
        if first is None:
            return prepared
        try:
            workflow.check_batching(first.value, "a request's input")
        except _RAISED_BY_MODEL as error:  # that request fails alone and says why; another request will check
            log.info("batching check on a request's input failed (%s); those requests run alone", first_line(error))
            return _alone(prepared)
        workflow.batching_check_pending = False
        log.info("batching check on a request's input: %s", workflow.info.get("batching"))
    if getattr(workflow, "batching", True) is False:
        return _alone(prepared)
    return prepared


def _alone(prepared: list[Any]) -> list[Any]:
    return [_Item(entry.value, None) if isinstance(entry, _Item) else entry for entry in prepared]


def _run_one_of_group(workflow: InferenceWorkflow, item: Any) -> Any:
    try:
        [output] = _run_group(workflow, [item])
    except _RAISED_BY_MODEL as e:
        return failure(_as_model_error(e, workflow, item))
    return _Output(output)


def _run_alone(workflow: InferenceWorkflow, item: Any) -> Any:
    try:
        return _Output(workflow.run_model(item))
    except _RAISED_BY_MODEL as e:
        return failure(_as_model_error(e, workflow, item))


def _postprocess(workflow: InferenceWorkflow, output: Any) -> Outcome:
    try:
        return answer(workflow.postprocess(output))
    except ServiceError as e:
        return failure(e)
    except _RAISED_ON_THE_LOOP as e:
        log.exception("postprocess failed")
        return failure(ServiceError(f"postprocess failed: {first_line(e)}"))


def _legacy_inference(workflow: Any, data: Any) -> Outcome:
    try:
        return answer(workflow.inference(data))
    except _RAISED_BY_MODEL as e:
        return failure(_with_note(_as_model_error(e), request_note(data)))


# What a workflow's code may raise for one request and still fail only that request. On the model thread no signal
# arrives, so SystemExit and KeyboardInterrupt there are the model's own (they failed every request of the batch);
# on the event loop KeyboardInterrupt is Ctrl-C and must stop the server.
_RAISED_BY_MODEL = (Exception, SystemExit, KeyboardInterrupt)
_RAISED_ON_THE_LOOP = (Exception, SystemExit)


def _as_model_error(error: BaseException, workflow: Any = None, item: Any = None) -> ServiceError:
    """The 422 of a model that raised on ``item``: the model's own words, then what ``workflow.describe_input(item)``
    knows (the one place every route's and both paths' message is built). A ``ModelError`` or ``InputError`` the
    workflow raised itself keeps its status and words and gets the same note; other ``ServiceError``s (503, 500)
    are not about the input and stay as they are."""
    note = _described_input(workflow, item)
    if isinstance(error, ServiceError):
        return _with_note(error, note)
    said = _said(error) if isinstance(error, Exception) else f"it raised {type(error).__name__}({first_line(error)})"
    return ModelError(f"the model failed on this input: {said}" + (f"; {note}" if note else ""))


def _failed_on_request(error: BaseException, data: Any) -> Outcome:
    """The outcome of a workflow's ``preprocess`` (or ``batch_key``) that raised on a request's ``data``: a
    ``ServiceError``'s own status (a ``ModelError``: 422), anything else 400, with the request's tensor shapes and
    dtypes after the workflow's words (``request_note``), as a failed forward has the model's input's."""
    error = error if isinstance(error, ServiceError) else InputError(_said(error))
    return failure(_with_note(error, request_note(data)))


def _with_note(error: ServiceError, note: str | None) -> ServiceError:
    """``error`` with ``; note`` after its first line, when it is about the input (``ModelError``, ``InputError``)
    and does not say it already (its text, or ``input_described`` set true on it). A new error of the same status:
    the workflow's own class may take other arguments than a message."""
    if not note or not isinstance(error, (ModelError, InputError)) or getattr(error, "input_described", False):
        return error
    said = first_line(error)
    if note in said:  # a workflow that already described the input (or an error described twice)
        return error
    noted = ModelError(f"{said}; {note}") if isinstance(error, ModelError) else InputError(f"{said}; {note}")
    noted.status = error.status
    return noted


def request_note(data: Any) -> str | None:
    """What a failure of a request's own ``data`` adds: its contract tensors' shapes and dtypes as sent, never
    their values: ``the input had shape [2, 3] float`` for a lone tensor (``{"dtype", "shape"?, "values"}``),
    ``the inputs had shapes "a" [2, 3] float, "b" [2] long`` for an object of them (at most 8 named). None for data
    that holds no tensor. Any thread; raises nothing; bounded by MAX_RANK levels and 8 tensors."""
    if not isinstance(data, dict):
        return None
    lone = _sent_tensor(data)
    if lone is not None:
        return f"the input had shape {lone}"
    for nested in ("inputs", "input"):  # the ONNX form and the built-in workflow's named input
        if isinstance(data.get(nested), dict) and len(data) == 1:
            data = data[nested]
            lone = _sent_tensor(data)
            if lone is not None:
                return f"the input had shape {lone}"
    named = [(key, _sent_tensor(value)) for key, value in itertools.islice(data.items(), 8)]
    named = [(key, shown) for key, shown in named if shown is not None]
    if not named:
        return None
    return "the inputs had shapes " + ", ".join(f"{json_text(key, 20)} {shown}" for key, shown in named)


def _sent_tensor(value: Any) -> str | None:
    """``[2, 3] float`` for a contract tensor as sent (its ``shape`` when it gives a valid one, else the nesting of
    its ``values``), else None."""
    if not isinstance(value, dict) or "values" not in value:
        return None
    shape = value.get("shape")
    if not (isinstance(shape, list) and len(shape) <= MAX_RANK and all(type(n) is int and n >= 0 for n in shape)):
        shape, level = [], value["values"]
        while isinstance(level, list) and len(shape) <= MAX_RANK:
            shape.append(len(level))
            level = level[0] if level else None
    dtype = value.get("dtype")
    return _shown(shape) + (f" {dtype}" if dtype in DTYPE_NAMES else "")


def _described_input(workflow: Any, item: Any) -> str | None:
    describe = getattr(workflow, "describe_input", None)
    if not callable(describe):
        return None
    try:
        note = describe(item)
    except Exception:  # a hint that fails must not replace the model's own words
        log.debug("describe_input failed", exc_info=True)
        return None
    return note if isinstance(note, str) and note else None


def _said(error: BaseException) -> str:
    """``first_line(error)``, named as a KeyError when it is one: its text is only the key (``'x'``), which tells the
    client nothing."""
    return f"KeyError: {first_line(error)}" if isinstance(error, KeyError) else first_line(error)
