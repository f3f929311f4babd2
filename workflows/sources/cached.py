"""Which models the model cache (``MODEL_CACHE_DIR``, workflows/sources/cache.py) holds verified, as model ids: the
per-request loader (workflows/per_request.py) would find these files there and not download them again.

* Arweave: ``arweave/<tx>/verified.json`` beside its file: signed by ``owner``, tagged ``Repo-Name`` (or
  ``Model-Id``) and ``File-Name``: ``arweave/<owner>/<repo>:<file>``.
* Hugging Face: the files stay in the Hub's own cache; ``huggingface/hashes/*.json`` records each one verified
  (its blob's path, size, mtime and sha256). The blob sits in ``models--<org>--<repo>/blobs/``, and the snapshot
  link that points at it names the file: ``huggingface/<org>/<repo>:<file>``.

Only entries whose file is still there with the size and modification time recorded when it was verified are
listed (a changed file would be hashed again before use). Reads the disk: call it off the event loop.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from core.model_ids import ModelId, ModelIdError, parse_model_id
from workflows.sources.cache import RECORD, unchanged

log = logging.getLogger("workflows.sources.cached")

MAX_LISTED = 100  # a listing for /service-resources, not an inventory: bounded whatever the cache holds


def cached_models(root: Path, limit: int = MAX_LISTED) -> list[dict[str, Any]]:
    """Up to ``limit`` ``{"model_id", "bytes", "sha256"}``, one per model id, sorted by id, plus ``"pickled"`` (what
    loading the file would unpickle: workflows/model_formats.py ``pickled``) for a file that a load refuses unless
    pickles are trusted for it (core/model_ids.py ``pickles_trusted``): /service-resources answers for a cached
    model what its load would. Never raises for an unreadable or unexpected entry (skipped)."""
    found: dict[str, dict[str, Any]] = {}
    for entry in cache_entries(root):
        if len(found) >= limit:
            break
        model: ModelId = entry["model_id"]
        # Built from the cache's parts (signed tags, folder names): listed only when a request naming the id would
        # name this same model (a Repo-Name holding "/" reads back as another repo and version: a 404 for the node).
        try:
            named = parse_model_id(str(model))
        except ModelIdError as e:
            named, reason = None, str(e)
        else:
            reason = f"the id {str(model)!r} names another model ({named})"
        if named != model:
            log.info("cached model not listed: %s", reason)
            continue
        if str(model) not in found:
            found[str(model)] = {key: entry[key] for key in ("bytes", "sha256")} | {"model_id": str(model)}
            if pickled := _pickled(entry["path"]):
                found[str(model)]["pickled"] = pickled
    return [found[key] for key in sorted(found)]


# Verified files do not change (a changed one is not listed), so each is read once: (path, size, mtime) -> pickled.
_PICKLED: dict[tuple[str, int, int], str | None] = {}


def _pickled(path: Path) -> str | None:
    """``model_formats.pickled`` of a cached file, remembered; None for an ONNX file (it never unpickles) or one that
    cannot be read (its load says why)."""
    try:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _PICKLED:
            from workflows import model_formats  # torch: the runner's, only when a cache is listed
            from workflows.onnx_workflow import is_onnx

            onnx = is_onnx(path)
            _PICKLED[key] = None if onnx else model_formats.pickled(path, model_formats.detect(path))
            while len(_PICKLED) > 4 * MAX_LISTED:
                _PICKLED.pop(next(iter(_PICKLED)))
        return _PICKLED[key]
    except Exception:  # ArchiveTooLarge, OSError: the load refuses it with its own reason
        return None


def cache_entries(root: Path) -> Any:
    """Every verified file of the cache, as it stands: ``{"model_id": ModelId, "bytes", "sha256", "path": Path (the
    model's file), "record": Path, "files": [Path, ...]}``, one per model id (a Hugging Face blob that several names
    link to is one per name, with the same ``record``). ``record``: the file whose modification time is the entry's
    last use
    (workflows/sources/disk_bound.py); ``files``: what removing the entry removes, the record last."""
    root = Path(root).expanduser()
    yield from _arweave(root)
    yield from _huggingface(root)


def _arweave(root: Path) -> Any:
    for record_path in _children(root / "arweave", RECORD):
        record = _read(record_path)
        tags = record.get("tags") if isinstance(record.get("tags"), dict) else {}
        repo = tags.get("Repo-Name") or tags.get("Model-Id")
        filename, owner = tags.get("File-Name"), record.get("owner")
        if not all(isinstance(v, str) and v for v in (repo, filename, owner, record.get("file"))):
            continue
        path = record_path.parent / record["file"]
        if unchanged(path, record):
            model = ModelId(source="arweave", owner=owner, repo=repo, filename=filename)
            yield _entry(model, record, record_path, path, [path])


def _huggingface(root: Path) -> Any:
    for record_path in _children(root / "huggingface" / "hashes", None):
        record = _read(record_path)
        if not isinstance(record.get("path"), str):
            continue
        blob = Path(record["path"])
        repo_dir = blob.parent.parent
        if blob.parent.name != "blobs" or not repo_dir.name.startswith("models--"):
            continue
        if not unchanged(blob, record):
            continue
        org, sep, repo = repo_dir.name.removeprefix("models--").partition("--")
        if not sep:
            continue
        links = _snapshot_links(repo_dir, blob)
        for filename in sorted({name for name, _ in links}):  # one name may be linked in several snapshots
            model = ModelId(source="huggingface", owner=org, repo=repo, filename=filename)
            yield _entry(model, record, record_path, blob, [*(link for _, link in links), blob])


def _snapshot_links(repo_dir: Path, blob: Path) -> list[tuple[str, Path]]:
    """(file name in the repository, snapshot link) of every snapshot link that points at ``blob``, by name."""
    links = []
    try:
        for link in (repo_dir / "snapshots").glob("*/**/*"):
            if link.is_symlink() and link.resolve() == blob:
                links.append((link.relative_to(repo_dir / "snapshots").as_posix().split("/", 1)[1], link))
    except OSError:
        pass
    return sorted(links)


def _children(directory: Path, name: str | None) -> list[Path]:
    """``directory/*/name`` (or ``directory/*.json`` without a name), in a stable order."""
    try:
        if name is None:
            return sorted(directory.glob("*.json"))
        return sorted(p / name for p in directory.iterdir() if (p / name).is_file())
    except OSError:
        return []


def _entry(
    model_id: ModelId, record: dict[str, Any], record_path: Path, path: Path, paths: list[Path]
) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "path": path,
        "bytes": record.get("size"),
        "sha256": record.get("sha256"),
        "record": record_path,
        "files": [*paths, record_path],
    }


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
