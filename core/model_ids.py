"""Model ids of the newer Infernet torch services, and the operator's allow-list of them.

Pure functions (no I/O, no torch): they run wherever a request is parsed (an API worker's event loop) and at
start-up for the ``ALLOWED_MODELS`` setting. Every malformed id raises :class:`ModelIdError` (a ``ValueError``; the
service answers 400), every malformed setting :class:`AllowListError`.

Formats (read from ``ritual-net/infernet-monorepo``; no code taken from it):

* infernet-ml 2.0 (tags v2.0.0, v2.1.0), ``libraries/infernet_ml/src/infernet_ml/utils/specs/ml_model_id.py`` and
  ``resource/repo_id.py``: the unique id ``{storage}/{owner}/{name}[/{version}][:{file}[,{file}...]]`` with storage
  ``local``, ``arweave`` or ``huggingface`` (``resource/types.py`` ``StorageId``). Its ABI form, used in CHAIN
  requests (``services/torch.py`` ``TorchInferenceRequest.from_web3``), is
  ``abi.encode(bytes repo, string files)`` with ``repo = abi.encode(uint8 storage, string owner, string name,
  string version)``, ``files`` the comma-joined file names, an empty ``version`` meaning none, and the storage
  numbered ``local = 0, arweave = 1, huggingface = 2`` (``StorageIdInt``).
* infernet-ml 1.x (tag v1.0.0), ``utils/model_loader.py``: ``model_source`` (``ModelSource``: ``LOCAL = 0``,
  ``ARWEAVE = 1``, ``HUGGINGFACE_HUB = 2``, the same numbering) and ``load_args`` ``{"repo_id": "owner/name",
  "filename", "version"?}``; ``version`` is the Hugging Face revision or the Arweave ``File-Version``.

The grammar this module accepts (stricter than the originals, which split on ``/`` and ``:`` and take any text)::

    model_id = source "/" owner "/" repo [ "/" version ] [ ":" file ]
    source   = "huggingface" | "arweave"            ("local" only where the caller allows it, never from a request)
    owner    = huggingface: [A-Za-z0-9] [A-Za-z0-9._-]{0,95}     arweave: a wallet address, [A-Za-z0-9_-]{43}
    repo     = [A-Za-z0-9] [A-Za-z0-9._-]{0,95}
    version  = [A-Za-z0-9] [A-Za-z0-9._+-]{0,127}
    file     = one or more "/"-separated parts, each [A-Za-z0-9_] [A-Za-z0-9._+-]{0,127}, 255 characters at most

One file only: 2.0 allows ``a,b`` (a model of several files), a torch model is one file, so a list is refused. Without
``:file`` the id names no file (``filename is None``); the caller picks its default file name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from eth_abi import decode, encode
from eth_abi.exceptions import DecodingError

from core.errors import first_line
from core.terms import json_text, json_type

# Longest canonical id: source, 96 + 96 + 128 + 255 characters and separators; longer text is refused unread.
MAX_MODEL_ID_CHARS = 600
# The ABI form holds five short strings: a few words each. Bounding the bytes bounds the decoder's work.
MAX_MODEL_ID_ABI_BYTES = 2048
MAX_ALLOWED_PATTERNS = 256

SOURCES = ("huggingface", "arweave", "local")

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_ARWEAVE_OWNER = r"[A-Za-z0-9_-]{43}"
_VERSION = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_FILE_PART = r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}"
_MAX_FILE_CHARS = 255
_FULL = {
    "name": re.compile(_NAME),
    "arweave_owner": re.compile(_ARWEAVE_OWNER),
    "version": re.compile(_VERSION),
    "file_part": re.compile(_FILE_PART),
}


class ModelIdError(ValueError):
    """A model id (text, 1.x fields or ABI bytes) that does not follow the grammar, or a Hugging Face id the Hub's
    naming rules refuse (the client's mistake: 400); the message names it and the rule."""


class AllowListError(ValueError):
    """A malformed ``ALLOWED_MODELS`` setting; the message starts with the variable's name."""


class StorageCode(IntEnum):
    """The storage numbering shared by 1.x ``ModelSource`` and 2.0 ``StorageIdInt``."""

    LOCAL = 0
    ARWEAVE = 1
    HUGGINGFACE = 2


_SOURCE_BY_CODE = {StorageCode.LOCAL: "local", StorageCode.ARWEAVE: "arweave", StorageCode.HUGGINGFACE: "huggingface"}
_CODE_BY_SOURCE = {name: code for code, name in _SOURCE_BY_CODE.items()}
# 1.x names (the enum's member names) and this project's KW_ARGS spellings, case-insensitive.
_V1_SOURCE_NAMES = {
    "local": "local",
    "arweave": "arweave",
    "huggingface_hub": "huggingface",
    "huggingface": "huggingface",
}


@dataclass(frozen=True)
class ModelId:
    """One model file in a repository: ``str()`` gives the canonical id back (``parse_model_id(str(m)) == m``)."""

    source: str
    owner: str
    repo: str
    filename: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        text = f"{self.source}/{self.owner}/{self.repo}"
        if self.version is not None:
            text += f"/{self.version}"
        if self.filename is not None:
            text += f":{self.filename}"
        return text

    @property
    def repo_id(self) -> str:
        """``owner/repo``: the Hugging Face repo id, or the Arweave ``owner/name`` of 1.x ``load_args``."""
        return f"{self.owner}/{self.repo}"

    @property
    def storage_code(self) -> int:
        """The source's number in the ABI forms (1.x ``ModelSource``, 2.0 ``StorageIdInt``)."""
        return int(_CODE_BY_SOURCE[self.source])


def parse_model_id(text: Any, *, allow_local: bool = False) -> ModelId:
    """A 2.0 unique id (``huggingface/Org/repo[/version][:file]``) -> ModelId.

    Raises ModelIdError naming the id and what is wrong. ``local/...`` ids name a folder on the server: refused
    unless ``allow_local`` (the operator's own configuration may use them, a request never).
    """
    if not isinstance(text, str):
        raise ModelIdError(f"model id: expected a string like 'huggingface/Org/repo:file', got {json_type(text)}")
    if len(text) > MAX_MODEL_ID_CHARS:
        raise ModelIdError(f"model id {text[:40]!r}...: longer than {MAX_MODEL_ID_CHARS} characters")
    path, colon, files = text.partition(":")
    if ":" in files:
        raise ModelIdError(f"model id {text!r}: more than one ':' (expected source/owner/repo[/version][:file])")
    if colon and not files:
        raise ModelIdError(f"model id {text!r}: empty file name after ':'")
    parts = path.split("/")
    if len(parts) not in (3, 4):
        raise ModelIdError(
            f"model id {text!r}: expected source/owner/repo[/version][:file], got {len(parts)} '/'-separated parts"
        )
    source, owner, repo = parts[:3]
    version = parts[3] if len(parts) == 4 else None
    filename = _one_file(text, files) if colon else None
    return _checked(text, source, owner, repo, filename, version, allow_local=allow_local)


NamesServed = Callable[[str], bool]  # whether a model id's text names the served start-up model (resources.supports)


def _served(names_served: NamesServed | None, source: str, repo_id: Any, filename: Any, version: Any = "") -> bool:
    """Whether the model fields name the served model, checked before anything that could refuse them (a LOCAL
    source, say): the served model is answered by whatever id /info and /service-resources advertise for it."""
    if names_served is None or not all(isinstance(v, str) for v in (repo_id, filename, version or "")):
        return False
    text = f"{source}/{repo_id}" + (f"/{version}" if version else "") + (f":{filename}" if filename else "")
    return names_served(text)


def model_id_from_v1(model_source: Any, load_args: Any, names_served: NamesServed | None = None) -> ModelId | None:
    """The 1.x OFFCHAIN fields ``model_source`` + ``load_args`` -> ModelId; None when both are absent (default model).

    ``model_source`` is the 1.x ``ModelSource`` number (0, 1, 2) or its name (``HUGGINGFACE_HUB``, ``ARWEAVE``,
    case-insensitive; ``huggingface`` too). ``load_args`` is ``{"repo_id": "owner/name", "filename": ...,
    "version"?: ...}``; ``cache_path`` is ignored (a caller must not choose a folder on the server), and the LOCAL
    source (``{"path": ...}``) is refused, unless ``names_served`` says the fields name the served model (then
    None, the default call). Raises ModelIdError.
    """
    if model_source is None and load_args is None:
        return None
    if model_source is None or load_args is None:
        given, missing = ("model_source", "load_args") if load_args is None else ("load_args", "model_source")
        raise ModelIdError(f"{given} without {missing}: a 1.x request names a model with both")
    source = _v1_source(model_source)
    if not isinstance(load_args, dict):
        raise ModelIdError(f"load_args: expected an object with repo_id and filename, got {json_type(load_args)}")
    repo_id, filename, version = load_args.get("repo_id"), load_args.get("filename"), load_args.get("version")
    if _served(names_served, source, repo_id, filename, version):
        return None
    if source == "local":
        raise ModelIdError("model_source LOCAL: a request cannot name a file on the server")
    for key, value in (("repo_id", repo_id), ("filename", filename)):
        if not isinstance(value, str) or not value:
            raise ModelIdError(f"load_args.{key}: expected a non-empty string, got {json_type(value)}")
    if version is not None and not isinstance(version, str):
        raise ModelIdError(f"load_args.version: expected a string, got {json_type(version)}")
    return model_id_from_v1_chain(_CODE_BY_SOURCE[source], repo_id, filename, version or "")


def model_id_from_v1_chain(
    source: int, repo_id: str, filename: str, version: str, names_served: NamesServed | None = None
) -> ModelId | None:
    """The model fields of a 1.x CHAIN request (``uint8 source, string repo_id, string filename, string version``).

    All three strings empty name the default model (None), whatever ``source`` says: that is what the 1.x
    service did. Fields that name the served model (``names_served``) are the default call too, whatever their
    source. Otherwise ``source`` must be 1 (Arweave) or 2 (Hugging Face). Raises ModelIdError.
    """
    if repo_id == "" and filename == "" and version == "":
        return None
    if source in tuple(StorageCode) and _served(
        names_served, _SOURCE_BY_CODE[StorageCode(source)], repo_id, filename, version
    ):
        return None
    if source not in (StorageCode.ARWEAVE, StorageCode.HUGGINGFACE):
        what = "LOCAL: a request cannot name a file on the server" if source == StorageCode.LOCAL else "unknown"
        raise ModelIdError(f"model source {source}: {what} (1 = Arweave, 2 = Hugging Face)")
    label = f"repo_id {repo_id!r}"
    owner, slash, repo = repo_id.partition("/")
    if not slash or "/" in repo:
        raise ModelIdError(f"{label}: expected owner/name")
    if not filename:
        raise ModelIdError(f"{label}: empty filename")
    text = f"{_SOURCE_BY_CODE[StorageCode(source)]}/{repo_id}:{filename}"
    checked_file = _one_file(text, filename)
    return _checked(text, _SOURCE_BY_CODE[StorageCode(source)], owner, repo, checked_file, version or None)


def decode_model_id_abi(blob: bytes, names_served: NamesServed | None = None) -> ModelId | None:
    """The 2.0 ABI form of a model id (the ``model_id`` bytes of a CHAIN request) -> ModelId; empty -> None.

    ``blob = abi.encode(bytes repo, string files)``, ``repo = abi.encode(uint8 storage, string owner, string name,
    string version)``. Both levels must be the canonical encoding (what Solidity's ``abi.encode`` writes: no
    trailing bytes, no moved offsets, zero padding). An id that names the served model (``names_served``) is None,
    whatever its storage. Raises ModelIdError.
    """
    if len(blob) == 0:
        return None
    if len(blob) > MAX_MODEL_ID_ABI_BYTES:
        raise ModelIdError(f"model_id: {len(blob)} bytes, more than {MAX_MODEL_ID_ABI_BYTES}")
    repo_blob, files = strict_abi_decode(("bytes", "string"), blob, "model_id")
    storage, owner, name, version = strict_abi_decode(
        ("uint8", "string", "string", "string"), repo_blob, "model_id repo"
    )
    if storage not in tuple(StorageCode):
        raise ModelIdError(f"model_id: storage {storage} is unknown (1 = Arweave, 2 = Hugging Face)")
    source = _SOURCE_BY_CODE[StorageCode(storage)]
    text = f"{source}/{owner}/{name}" + (f"/{version}" if version else "") + (f":{files}" if files else "")
    if names_served is not None and names_served(text):
        return None
    if source == "local":
        raise ModelIdError(f"model id {text!r}: a request cannot name a file on the server (storage 0, local)")
    filename = _one_file(text, files) if files else None
    return _checked(text, source, owner, name, filename, version or None)


def encode_model_id_abi(model_id: ModelId) -> bytes:
    """ModelId -> the 2.0 ABI form (inverse of :func:`decode_model_id_abi`); used by tests and clients."""
    repo = encode(
        ["uint8", "string", "string", "string"],
        [model_id.storage_code, model_id.owner, model_id.repo, model_id.version or ""],
    )
    return encode(["bytes", "string"], [repo, model_id.filename or ""])


def parse_allowed_models(raw: str | None, name: str = "ALLOWED_MODELS") -> tuple[str, ...]:
    """The ``ALLOWED_MODELS`` setting -> its patterns; unset or blank -> () (nothing but the default model).

    A JSON list of strings (``["huggingface/Ritual-Net/*"]``) or comma-separated text. Each pattern follows the
    model id grammar with ``*`` allowed inside any segment but the source (see :func:`allowed`). Runs once at
    start-up; raises AllowListError naming the variable and the bad pattern.
    """
    text = (raw or "").strip()
    if not text:
        return ()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise AllowListError(f"{name}: expected a JSON list, got malformed JSON ({e.msg} at {e.pos})") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise AllowListError(f"{name}: expected a JSON list of model id patterns (strings)")
    else:
        items = text.split(",")
    patterns = tuple(dict.fromkeys(i.strip() for i in items if i.strip()))
    if len(patterns) > MAX_ALLOWED_PATTERNS:
        raise AllowListError(f"{name}: {len(patterns)} patterns, more than {MAX_ALLOWED_PATTERNS}")
    for pattern in patterns:
        try:
            _compile_pattern(pattern)
        except ModelIdError as e:
            raise AllowListError(f"{name}: {e}") from None
    return patterns


def allowed(model_id: ModelId, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether any pattern allows ``model_id``.

    The rule, segment by segment (safer than one glob over the whole id, where ``huggingface/*/iris`` would also
    allow ``huggingface/evil/x/iris``, read as repo ``x`` at version ``iris``):

    * a pattern is ``source/owner/repo[/version][:file]``; the id and the pattern must have the same source, written
      out (``huggingface``, ``arweave``; no ``*``);
    * in owner, repo, version and file, ``*`` matches any run of characters inside that one segment, never a ``/``
      or ``:``; no other character is special (no ``?``, no ``[...]``, no ``**``);
    * a pattern without a version allows every version and ids without one (on the Hugging Face Hub, a version
      that is not spelled out must also be a branch, a tag or a commit one of them points at: see
      :func:`version_spelled_out`); a pattern without ``:file`` allows
      every file and ids without one; a pattern with a version (even ``*``) or a file allows only ids that name a
      matching one (``*`` in a file pattern does not cross the ``/`` of a sub-folder);
    * matching is case-sensitive: Arweave addresses are, and a Hugging Face name spelt differently is refused
      rather than allowed (never more than the operator wrote).

    Patterns are checked as :func:`parse_allowed_models` checks them; a malformed one raises ModelIdError.
    """
    text = str(model_id)
    return any(_compile_pattern(p).fullmatch(text) for p in patterns)


def pickles_trusted(model_id: ModelId, allow_pickled_models: bool, arweave_owners: tuple[str, ...] | list[str]) -> bool:
    """Whether a per-request model may be loaded when loading it runs code (a pickle, a torch.export archive with
    pickled entries): only with ``ALLOW_PICKLED_MODELS`` or from an Arweave owner in ``ALLOWED_ARWEAVE_OWNERS``.
    The one rule for both sides: the runner's load (workflows/per_request.py) and /service-resources'
    answer for a model cached on disk (public/resources.py)."""
    return allow_pickled_models or (model_id.source == "arweave" and model_id.owner in arweave_owners)


def pickle_refused(model_id: str, pickled: str) -> str:
    """The 403's words for a model ``pickles_trusted`` refuses; ``pickled``: what in it would be unpickled
    (workflows/model_formats.py ``pickled``: ``a pickle``, ``a torch.export archive with pickled entries (...)``)."""
    return (
        f"model {model_id} is {pickled} (loading it runs its uploader's code); per-request models must be "
        "TorchScript, torch.export (.pt2) without pickled entries or ONNX unless ALLOW_PICKLED_MODELS=true or the "
        "Arweave owner is in ALLOWED_ARWEAVE_OWNERS"
    )


def version_spelled_out(model_id: ModelId, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether a pattern that allows ``model_id`` writes its version out in full (no ``*`` in the version segment).

    Only then did the operator choose that version. A pattern without a version (or with ``*`` in it) allows "every
    version", and on the Hugging Face Hub anyone can push a commit to a public repository's ``refs/pr/N``: such an
    id is checked against the repository's branches and tags before download (workflows/per_request.py). An id
    without a version -> False (it names the default branch, which needs no check). Patterns as in :func:`allowed`.
    """
    if model_id.version is None:
        return False
    text = str(model_id)
    for pattern in patterns:
        parts = pattern.partition(":")[0].split("/")
        if len(parts) == 4 and "*" not in parts[3] and _compile_pattern(pattern).fullmatch(text):
            return True
    return False


_PATTERN_CACHE: dict[str, re.Pattern[str]] = {}


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    compiled = _PATTERN_CACHE.get(pattern)
    if compiled is not None:
        return compiled
    if len(pattern) > MAX_MODEL_ID_CHARS:
        raise ModelIdError(f"pattern {pattern[:40]!r}...: longer than {MAX_MODEL_ID_CHARS} characters")
    if "**" in pattern:
        raise ModelIdError(f"pattern {pattern!r}: '**' is not supported; '*' matches within one segment")
    path, colon, file_pattern = pattern.partition(":")
    parts = path.split("/")
    if len(parts) not in (3, 4) or ":" in file_pattern or (colon and not file_pattern):
        raise ModelIdError(
            f"pattern {pattern!r}: expected source/owner/repo[/version][:file] with '*' inside segments "
            "(e.g. huggingface/Ritual-Net/*)"
        )
    source = parts[0]
    if source not in ("huggingface", "arweave"):
        raise ModelIdError(f"pattern {pattern!r}: the source must be huggingface or arweave, written out")
    # Without '*' a segment must be valid as it stands; with '*' its other characters must be allowed there.
    kinds = ["arweave_owner" if source == "arweave" else "name", "name", "version"]
    for segment_text, kind in zip(parts[1:], kinds, strict=False):
        _check_pattern_segment(pattern, segment_text, kind)
    if colon:
        for part in file_pattern.split("/"):
            _check_pattern_segment(pattern, part, "file_part")

    def segment(text: str) -> str:
        return "[^/:]*".join(re.escape(piece) for piece in text.split("*"))

    # Matched against the canonical id, where owner and repo never hold '/' or ':', so segments cannot shift.
    regex = f"{re.escape(source)}/{segment(parts[1])}/{segment(parts[2])}"
    regex += f"/{segment(parts[3])}" if len(parts) == 4 else "(?:/[^/:]+)?"
    regex += f":{segment(file_pattern)}" if colon else "(?::[^:]+)?"
    compiled = re.compile(regex)
    if len(_PATTERN_CACHE) < 4 * MAX_ALLOWED_PATTERNS:
        _PATTERN_CACHE[pattern] = compiled
    return compiled


_PATTERN_CHARS = {
    "name": re.compile(r"[A-Za-z0-9._*-]{1,96}"),
    "arweave_owner": re.compile(r"[A-Za-z0-9_*-]{1,43}"),
    "version": re.compile(r"[A-Za-z0-9._+*-]{1,128}"),
    "file_part": re.compile(r"[A-Za-z0-9._+*-]{1,128}"),
}


def _check_pattern_segment(pattern: str, text: str, kind: str) -> None:
    valid = _FULL[kind].fullmatch(text) if "*" not in text else _PATTERN_CHARS[kind].fullmatch(text)
    if not valid:
        raise ModelIdError(f"pattern {pattern!r}: {text!r} is not a valid {kind.replace('_', ' ')} or '*' pattern")


def _checked(
    text: str,
    source: str,
    owner: str,
    repo: str,
    filename: str | None,
    version: str | None,
    *,
    allow_local: bool = False,
) -> ModelId:
    label = f"model id {text!r}"
    if source not in SOURCES:
        raise ModelIdError(f"{label}: unknown source {source!r} (expected huggingface or arweave)")
    if source == "local" and not allow_local:
        raise ModelIdError(f"{label}: a request cannot name a file on the server (source local)")
    if source == "arweave":
        if not _FULL["arweave_owner"].fullmatch(owner):
            raise ModelIdError(
                f"{label}: owner {owner!r} is not an Arweave wallet address (43 characters A-Z a-z 0-9 _ -)"
            )
    elif not _FULL["name"].fullmatch(owner):
        raise ModelIdError(f"{label}: owner {owner!r} is not a valid name (letters, digits, . _ -; 96 at most)")
    if not _FULL["name"].fullmatch(repo):
        raise ModelIdError(f"{label}: repo {repo!r} is not a valid name (letters, digits, . _ -; 96 at most)")
    if version is not None and not _FULL["version"].fullmatch(version):
        raise ModelIdError(f"{label}: version {version!r} is not valid (letters, digits, . _ + -; 128 at most)")
    if source == "huggingface":
        _hub_rules(label, f"{owner}/{repo}")
    return ModelId(source=source, owner=owner, repo=repo, filename=filename, version=version)


def _hub_rules(label: str, repo_id: str) -> None:
    """The Hub's own naming rules beyond the grammar above (no ``--`` or ``..``, no leading or trailing ``-`` or
    ``.``), from ``huggingface_hub`` itself so the two cannot drift: such an id is the client's mistake (400), not a
    failed download. Raises ModelIdError with the library's rule."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ModelIdError(f"{label}: {first_line(e)}") from None


def _one_file(text: str, files: str) -> str:
    label = f"model id {text!r}"
    if "," in files:
        count = len(files.split(","))
        raise ModelIdError(f"{label}: names {count} files; a torch model is one file")
    if len(files) > _MAX_FILE_CHARS:
        raise ModelIdError(f"{label}: file name longer than {_MAX_FILE_CHARS} characters")
    for part in files.split("/"):
        if not _FULL["file_part"].fullmatch(part):
            raise ModelIdError(
                f"{label}: file {files!r} is not a valid file name (parts of letters, digits, . _ + -, "
                "separated by '/', none empty or starting with '.')"
            )
    return files


def _v1_source(value: Any) -> str:
    if isinstance(value, bool):
        raise ModelIdError(f"model_source: expected 1 (ARWEAVE), 2 (HUGGINGFACE_HUB) or a name, got {json_text(value)}")
    if isinstance(value, int):
        if value not in tuple(StorageCode):
            raise ModelIdError(f"model_source: {value} is unknown (1 = ARWEAVE, 2 = HUGGINGFACE_HUB)")
        return _SOURCE_BY_CODE[StorageCode(value)]
    if isinstance(value, str) and value.lower() in _V1_SOURCE_NAMES:
        return _V1_SOURCE_NAMES[value.lower()]
    raise ModelIdError(f"model_source: {json_text(value)} is unknown (1 = ARWEAVE, 2 = HUGGINGFACE_HUB)")


def strict_abi_decode(
    types: tuple[str, ...], blob: bytes, what: str, error: type[ValueError] = ModelIdError
) -> tuple[Any, ...]:
    """eth_abi's decode, plus the check that ``blob`` is exactly what ``abi.encode`` writes for the values; raises
    ``error`` naming ``what`` otherwise (the service answers 400)."""
    try:
        values = decode(list(types), blob)
    except (DecodingError, ValueError, OverflowError) as e:  # UnicodeDecodeError is a ValueError
        raise error(f"{what}: not an ABI encoding of ({', '.join(types)}) ({short_message(e)})") from None
    if encode(list(types), list(values)) != blob:
        raise error(
            f"{what}: not the canonical ABI encoding of ({', '.join(types)}) (offsets, lengths or trailing bytes "
            "differ from what abi.encode writes)"
        )
    return values


def short_message(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= 120 else text[:117] + "..."
