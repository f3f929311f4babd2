"""Environment names of the newer Infernet torch services, read as this service's own (or refused).

An operator moving from ``ritual-net/infernet-monorepo``'s torch service keeps its env file. Ignoring those names
would serve the embedded example model with status 200, a wrong answer; so every name a predecessor read is either
translated to this service's exact equivalent, or stops start-up with one line that shows what to set instead.
Setting a legacy name and its new name to different values is refused: which one was meant cannot be known.

Names and value formats (read from the monorepo; no code taken from it):

* 1.x (tag v1.0.0), ``services/torch_inference_service/src/app.py``: ``MODEL_SOURCE`` (``ModelSource``: 0 LOCAL,
  1 ARWEAVE, 2 HUGGINGFACE_HUB) and ``LOAD_ARGS`` (JSON, quotes around it stripped; LOCAL ``{"model_path"}``,
  others ``{"repo_id": "owner/name", "filename", "version"?, "cache_path"?}``, where 1.x ignored ``version`` for
  Hugging Face). ``USE_JIT`` is this service's own name already. ``MODEL_ARGS`` is what 1.x's ``.env.example``
  wrote for ``LOAD_ARGS``; 1.x never read it.
* 2.0 (tags v2.0.0, v2.1.0), ``services/torch.py`` ``TorchServiceConfig`` read with Quart's
  ``from_prefixed_env("TORCH")`` (values JSON-decoded when they parse): ``TORCH_DEFAULT_MODEL_ID`` (a unique id,
  core/model_ids.py; ``local/...`` ids name ``{cache}/local/owner/name/{version or "default"}/file``),
  ``TORCH_USE_JIT`` (a pydantic bool), ``TORCH_CACHE_DIR`` (default ``~/.cache/ritual``).
* Both: ``TORCH_MODEL_LRU_CACHE_SIZE`` and ``ONNX_MODEL_LRU_CACHE_SIZE`` (models kept loaded, the default one
  counted) and ``LOGLEVEL`` (infernet-ml's log level).

Pure: :func:`translate` runs wherever core/settings.py reads the environment (every process); only the main process
prints the :class:`Mapped` notes (workflows/startup.py ``prepare``). Errors are StartupError, one line each.
"""

from __future__ import annotations

import json
from collections import ChainMap
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import StartupError

KW_ARGS = "CLASSIC_INF_WORKFLOW_KW_ARGS"
# Every name the predecessors read that this service does not read itself (USE_JIT and HF_TOKEN it does).
LEGACY_VARIABLES = (
    "MODEL_SOURCE", "LOAD_ARGS", "MODEL_ARGS", "TORCH_DEFAULT_MODEL_ID", "TORCH_USE_JIT", "TORCH_CACHE_DIR",
    "TORCH_MODEL_LRU_CACHE_SIZE", "ONNX_MODEL_LRU_CACHE_SIZE", "LOGLEVEL",
)  # fmt: skip
# Refused names: what to set instead. No exact equivalent exists, so guessing one would change what is served.
_LRU = (
    "is not read here: the models kept loaded besides the default one are bounded by MAX_LOADED_MODELS "
    "(the default model not counted) and MAX_LOADED_MODEL_BYTES, and per-request models must be allowed by "
    "ALLOWED_MODELS; set those and remove {name}"
)
REFUSED = {
    "MODEL_ARGS": (
        "was never read (infernet-ml 1.x's .env.example misspelt LOAD_ARGS): set MODEL_SOURCE and LOAD_ARGS, or "
        f"{KW_ARGS}" + '=\'{"model_source": "huggingface", "model_args": {"repo_id": "Org/repo", "filename": ...}}\''
    ),
    "TORCH_MODEL_LRU_CACHE_SIZE": _LRU,
    "ONNX_MODEL_LRU_CACHE_SIZE": _LRU,
}
_INFO_LEVELS = ("info", "20")
_V1_SOURCES = {"0": "local", "1": "arweave", "2": "huggingface", "local": "local", "arweave": "arweave",
               "huggingface_hub": "huggingface", "huggingface": "huggingface"}  # fmt: skip
_LOAD_ARGS_KEYS = {"local": {"model_path"}, "other": {"repo_id", "filename", "version", "cache_path"}}
# pydantic's bool, which 2.0 read TORCH_USE_JIT with (after Quart decoded JSON: 1 and 0 arrive as numbers).
_PYDANTIC_TRUE = ("1", "on", "t", "true", "y", "yes")
_PYDANTIC_FALSE = ("0", "off", "f", "false", "n", "no")
V2_DEFAULT_CACHE = Path.home() / ".cache" / "ritual"


@dataclass(frozen=True)
class Mapped:
    """One legacy name read as this service's ``read_as``; ``shown`` is a non-secret summary of the value."""

    legacy: str
    read_as: str
    shown: str


def translate(env: Mapping[str, str]) -> tuple[Mapping[str, str], tuple[Mapped, ...]]:
    """``env`` with every legacy name replaced by this service's equivalent, and what was mapped.

    Blank values count as unset, as everywhere in this service. Raises StartupError naming the legacy variable for
    a name without an equivalent, a malformed value, or a value that differs from its new name's."""
    # The settings read through this view, so that reads still reach ``env`` (a recording one in tests) by name.
    out: ChainMap[str, str] = ChainMap({}, dict.fromkeys(LEGACY_VARIABLES, ""), env)
    mapped: list[Mapped] = []
    for name, why in REFUSED.items():
        if _value(env, name):
            raise StartupError(f"{name} " + why.replace("{name}", name))
    level = _value(env, "LOGLEVEL")
    if level and level.lower() not in _INFO_LEVELS:
        raise StartupError(
            f"LOGLEVEL={level}: not read here (infernet-ml's log level); this service logs start-up, requests' "
            "errors and warnings at INFO, and BentoML's own logs follow `bentoml serve --verbose`; remove LOGLEVEL"
        )
    if level:
        mapped.append(Mapped("LOGLEVEL", "(INFO, this service's level)", level))
    if (raw := _value(env, "TORCH_USE_JIT")) is not None:
        use_jit = _v2_bool(raw)
        _same(env, "TORCH_USE_JIT", "USE_JIT", use_jit, (_value(env, "USE_JIT") or "").lower() in ("true", "1", "t"))
        out["USE_JIT"] = "true" if use_jit else "false"
        mapped.append(Mapped("TORCH_USE_JIT", "USE_JIT", out["USE_JIT"]))
    v1_cache = _v1_model(env, out, mapped)
    cache = _value(env, "TORCH_CACHE_DIR")
    cache = _json_string(cache) if cache is not None else None
    for legacy, value in (("TORCH_CACHE_DIR", cache), ("LOAD_ARGS cache_path", v1_cache)):
        if value is None:
            continue
        current = out.get("MODEL_CACHE_DIR", "").strip()
        if current and current != value:
            raise StartupError(
                f"{legacy} and MODEL_CACHE_DIR (or the other legacy cache setting) differ ({value!r} and "
                f"{current!r}); keep MODEL_CACHE_DIR only"
            )
        out["MODEL_CACHE_DIR"] = value
        mapped.append(Mapped(legacy.replace(" ", "."), "MODEL_CACHE_DIR", value))
    _v2_model(env, out, mapped, cache)
    return out, tuple(mapped)


def _v1_model(env: Mapping[str, str], out: MutableMapping[str, str], mapped: list[Mapped]) -> str | None:
    """MODEL_SOURCE + LOAD_ARGS -> the model of KW_ARGS; returns LOAD_ARGS's cache_path (None when absent)."""
    source_raw, args_raw = _value(env, "MODEL_SOURCE"), _value(env, "LOAD_ARGS")
    if source_raw is None and args_raw is None:
        return None
    if source_raw is None or args_raw is None:
        given, missing = ("MODEL_SOURCE", "LOAD_ARGS") if args_raw is None else ("LOAD_ARGS", "MODEL_SOURCE")
        raise StartupError(f"{given} without {missing}: infernet-ml 1.x named its model with both; set {missing}")
    source = _V1_SOURCES.get(source_raw.lower())
    if source is None:
        raise StartupError(f"MODEL_SOURCE: expected 0 (LOCAL), 1 (ARWEAVE) or 2 (HUGGINGFACE_HUB), got {source_raw!r}")
    try:
        args = json.loads(args_raw.strip("\"'"))  # 1.x stripped the quotes an env file may keep around the JSON
    except json.JSONDecodeError as e:
        raise StartupError(f"LOAD_ARGS: expected a JSON object, got malformed JSON ({e.msg} at {e.pos})") from None
    if not isinstance(args, dict):
        raise StartupError("LOAD_ARGS: expected a JSON object")
    known = _LOAD_ARGS_KEYS["local" if source == "local" else "other"]
    if unknown := sorted(set(args) - known):
        raise StartupError(f"LOAD_ARGS: unknown keys {unknown} for MODEL_SOURCE={source_raw} (known: {sorted(known)})")
    if not all(isinstance(v, str) and v for v in args.values()):
        raise StartupError("LOAD_ARGS: every value must be a non-empty string")
    if source == "local":
        if "model_path" not in args:
            raise StartupError("LOAD_ARGS: model_path is required for MODEL_SOURCE=0 (LOCAL)")
        model: dict[str, Any] = {"model_path": args["model_path"]}
    else:
        if source == "huggingface" and "version" in args:
            # 1.x dropped it and loaded the default branch: neither choice is certain to be what was meant.
            raise StartupError(
                f"LOAD_ARGS: infernet-ml 1.x ignored version for Hugging Face and loaded the main revision; remove "
                f"version to keep that, or set {KW_ARGS}"
                + '=\'{"model_source": "huggingface", "model_args": {"repo_id": ..., "filename": ..., "version": '
                + f"{json.dumps(args['version'])}"
                + "}}' to load that revision, and unset MODEL_SOURCE and LOAD_ARGS"
            )
        for key in ("repo_id", "filename"):
            if key not in args:
                raise StartupError(f"LOAD_ARGS: {key} is required for MODEL_SOURCE={source_raw}")
        from core.model_ids import ModelIdError, model_id_from_v1_chain

        code = {"arweave": 1, "huggingface": 2}[source]
        try:
            model_id = model_id_from_v1_chain(code, args["repo_id"], args["filename"], args.get("version", ""))
        except ModelIdError as e:
            raise StartupError(f"LOAD_ARGS: {e}") from None
        model = _model_kwargs(model_id)
    _set_model(env, out, "MODEL_SOURCE and LOAD_ARGS", model)
    mapped.append(Mapped("MODEL_SOURCE+LOAD_ARGS", KW_ARGS, json.dumps(model, separators=(",", ":"))))
    return args.get("cache_path")


def _v2_model(env: Mapping[str, str], out: MutableMapping[str, str], mapped: list[Mapped], cache: str | None) -> None:
    raw = _value(env, "TORCH_DEFAULT_MODEL_ID")
    if raw is None:
        return
    from core.model_ids import ModelIdError, parse_model_id

    try:
        model_id = parse_model_id(_json_string(raw), allow_local=True)
    except ModelIdError as e:
        raise StartupError(f"TORCH_DEFAULT_MODEL_ID: {e}") from None
    if model_id.source == "local":
        # 2.0 read a local id from its cache folder, laid out storage/owner/name/version ("default" without one).
        folder = Path(cache or V2_DEFAULT_CACHE) / "local" / model_id.owner / model_id.repo
        filename = model_id.filename or (_value(env, "TORCH_MODEL_FILE_NAME") or "model.torch")
        model: dict[str, Any] = {"model_path": str(folder / (model_id.version or "default") / filename)}
    else:
        model = _model_kwargs(model_id)
    _set_model(env, out, "TORCH_DEFAULT_MODEL_ID", model)
    mapped.append(Mapped("TORCH_DEFAULT_MODEL_ID", KW_ARGS, str(model_id)))


def _model_kwargs(model_id: Any) -> dict[str, Any]:
    """A Hugging Face or Arweave ModelId -> KW_ARGS's model_source + model_args (per-request ids map the same way,
    workflows/per_request.py: an Arweave repo is its name, signed by the owner the id names)."""
    args: dict[str, Any] = {"repo_id": model_id.repo_id if model_id.source == "huggingface" else model_id.repo}
    if model_id.source == "arweave":
        args["owners"] = [model_id.owner]
    if model_id.filename:
        args["filename"] = model_id.filename
    if model_id.version:
        args["version"] = model_id.version
    return {"model_source": model_id.source, "model_args": args}


_MODEL_KEYS = ("model_path", "model_name", "model_source", "model_args")


def _set_model(env: Mapping[str, str], out: MutableMapping[str, str], legacy: str, model: dict[str, Any]) -> None:
    """Put the legacy model into KW_ARGS (kept as they are otherwise); refuse a model named there already, or by
    the other legacy form, unless it is the same one, and a workflow class that is not the built-in torch one."""
    from core.settings import BUILTIN_TORCH_WORKFLOW, LEGACY_CLASS_PATHS, json_value

    class_path = _value(env, "CLASSIC_INF_WORKFLOW_CLASS") or BUILTIN_TORCH_WORKFLOW
    if LEGACY_CLASS_PATHS.get(class_path, class_path) != BUILTIN_TORCH_WORKFLOW:
        raise StartupError(
            f"{legacy} names a model of the built-in torch workflow, but CLASSIC_INF_WORKFLOW_CLASS is {class_path}; "
            f"name the model in {KW_ARGS} as that class expects and unset {legacy}"
        )
    kwargs = json_value(out, KW_ARGS, {}, dict)
    named = {key: kwargs[key] for key in _MODEL_KEYS if kwargs.get(key) not in (None, "")}
    if named and named != model:
        own = json_value(env, KW_ARGS, {}, dict)
        where = KW_ARGS if any(own.get(key) not in (None, "") for key in _MODEL_KEYS) else "MODEL_SOURCE and LOAD_ARGS"
        raise StartupError(
            f"{legacy} and {where} name different models ({json.dumps(model, separators=(',', ':'))} and "
            f"{json.dumps(named, separators=(',', ':'))}); keep one of them"
        )
    out[KW_ARGS] = json.dumps({**kwargs, **model})


def _same(env: Mapping[str, str], legacy: str, name: str, legacy_value: Any, new_value: Any) -> None:
    if _value(env, name) is not None and legacy_value != new_value:
        raise StartupError(
            f"{legacy} and {name} are both set and differ ({legacy_value!r} and {new_value!r}); keep {name} only"
        )


def _v2_bool(raw: str) -> bool:
    text = _json_string(raw).lower()
    if text in _PYDANTIC_TRUE:
        return True
    if text in _PYDANTIC_FALSE:
        return False
    raise StartupError(f"TORCH_USE_JIT: expected true or false, got {raw!r} (the same setting is USE_JIT)")


def _json_string(raw: str) -> str:
    """A 2.0 value as Quart's from_prefixed_env read it: JSON-decoded when that gives a string or number."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return str(value).lower() if isinstance(value, bool) else str(value) if isinstance(value, int | str) else raw


def _value(env: Mapping[str, str], name: str) -> str | None:
    from core.settings import env_value  # the one reader of a variable; imported late: core.settings imports this

    return env_value(env, name) or None
