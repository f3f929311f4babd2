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
    """Up to ``limit`` ``{"model_id", "bytes", "sha256"}``, one per model id, sorted by id. Never raises for an
    unreadable or unexpected entry (skipped)."""
    found: dict[str, dict[str, Any]] = {}
    root = Path(root).expanduser()
    for entry in (*_arweave(root), *_huggingface(root)):
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
        found.setdefault(str(model), {**entry, "model_id": str(model)})
    return [found[key] for key in sorted(found)]


def _arweave(root: Path) -> Any:
    for record_path in _children(root / "arweave", RECORD):
        record = _read(record_path)
        tags = record.get("tags") if isinstance(record.get("tags"), dict) else {}
        repo = tags.get("Repo-Name") or tags.get("Model-Id")
        filename, owner = tags.get("File-Name"), record.get("owner")
        if not all(isinstance(v, str) and v for v in (repo, filename, owner, record.get("file"))):
            continue
        if unchanged(record_path.parent / record["file"], record):
            yield _entry(ModelId(source="arweave", owner=owner, repo=repo, filename=filename), record)


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
        for filename in _snapshot_names(repo_dir, blob):
            yield _entry(ModelId(source="huggingface", owner=org, repo=repo, filename=filename), record)


def _snapshot_names(repo_dir: Path, blob: Path) -> list[str]:
    names = set()
    try:
        for link in (repo_dir / "snapshots").glob("*/**/*"):
            if link.is_symlink() and link.resolve() == blob:
                names.add(link.relative_to(repo_dir / "snapshots").as_posix().split("/", 1)[1])
    except OSError:
        pass
    return sorted(names)


def _children(directory: Path, name: str | None) -> list[Path]:
    """``directory/*/name`` (or ``directory/*.json`` without a name), in a stable order."""
    try:
        if name is None:
            return sorted(directory.glob("*.json"))
        return sorted(p / name for p in directory.iterdir() if (p / name).is_file())
    except OSError:
        return []


def _entry(model_id: ModelId, record: dict[str, Any]) -> dict[str, Any]:
    return {"model_id": model_id, "bytes": record.get("size"), "sha256": record.get("sha256")}


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
