"""GET /service-resources, in the shape Infernet nodes collect from their containers.

A node's ``GET /resources`` calls every container's ``/service-resources`` and returns the JSON it gets, keyed by
container id; with ``?model_id=X`` it asks instead whether the container serves that model. The shape is Ritual's
``ServiceResources`` (infernet-ml ``utils/spec.py``; the node documents it as ``ContainerToResourcesMap``):
``service_id``, ``compute_capability`` (id "ml", type "torch", the models) and ``hardware_capabilities``
(capability "base": OS, CPU, disks; "gpu": every GPU nvidia-smi sees, or without nvidia-smi the model's GPU as the
runner measured it when the model became ready), and ``{"supported": bool}`` for a model query.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from core.errors import FetchError
from core.hub import check_version_published
from core.model_ids import ModelIdError, allowed, parse_model_id, pickle_refused, pickles_trusted
from core.settings import ServiceSettings, hf_token, owner_list
from public import SERVICE_NAME

SPEC_VERSION = "0.1.0"  # of the ServiceResources format, not of this service


async def service_resources(app: Any, scope: Any) -> dict[str, Any]:
    """``GET /service-resources`` for the public app ``app`` (public/app.py ``PublicApp``), from its ``info()``. On
    the API worker's event loop; the disk and GPU listing in a thread."""
    info = await app.info()
    query = scope.get("query_string", b"").decode("latin-1")
    asked = dict(part.split("=", 1) for part in query.split("&") if "=" in part).get("model_id")
    if asked:
        # In a thread: the answer may ask the Hub whether a version is published (one refs request, bounded).
        return await asyncio.to_thread(model_support, unquote(asked), info, app.settings)
    cache = (info.get("model") or {}).get("cache_dir")
    # Disk usage and nvidia-smi block; keep them off the event loop.
    listing = await asyncio.to_thread(resources, SERVICE_NAME, info, Path(cache) if cache else None)
    if "models" in info:
        models = info["models"]
        # The runner lists what its cache holds; only what a request may name, and a load would not refuse as a
        # pickle, would be served from it.
        patterns = app.settings.allowed_models
        cached = [
            entry
            for entry in models.get("cached") or ()
            if allowed(parse_model_id(entry["model_id"]), patterns) and not refused_pickle(entry, app.settings)
        ]
        with_per_request_models(listing, models["loaded"], cached)
        listing["models"] = {
            "loaded": models["loaded"],
            "cached": cached,
            "allowed": list(patterns),
            "downloading": models.get("downloading") or [],  # runner/model_registry.py Download.describe
        }
    return listing


def model_support(asked: str, info: dict[str, Any], settings: ServiceSettings) -> dict[str, Any]:
    """``/service-resources?model_id=``: whether a request naming ``asked`` would be served, and (the node's
    ``ModelSupport``) in ``error`` why not: not allowed, not found, the last failed load's reason, a version the Hub
    has not published, or a pickle its load would refuse (a file cached on disk, whose format is known without a
    download). A model neither loaded nor cached is supported once those checks pass: its format and, for a source
    that does not state it, its size are known only once it is downloaded, and its first request's load decides."""
    allowed_models = settings.allowed_models
    if supports(asked, info):
        return {"supported": True}
    try:
        model = str(parse_model_id(asked))
    except ModelIdError as e:
        return {"supported": False, "error": f"malformed model id: {e}"}
    if not allowed(parse_model_id(model), allowed_models):
        return {"supported": False, "error": "not allowed"}
    models = info.get("models") or {}
    if any(entry["model_id"] == model for entry in models.get("loaded", ())):
        return {"supported": True}
    failed = (models.get("failed") or {}).get(model)
    if failed is not None:
        reason = "not found" if failed["status"] == 404 else failed["reason"]
        return {"supported": False, "error": reason}
    cached = next((entry for entry in models.get("cached") or () if entry["model_id"] == model), None)
    if cached is not None and (refusal := refused_pickle(cached, settings)):
        return {"supported": False, "error": refusal}
    try:  # the check a request's load makes first: a pull request's commit is refused there, so here too
        check_version_published(model, allowed_models, hf_token(os.environ))
    except FetchError as e:
        return {"supported": False, "error": str(e)}
    return {"supported": True}  # allowed; loaded on its first request


def refused_pickle(cached: dict[str, Any], settings: ServiceSettings) -> str | None:
    """The 403's words when the load of a cached model (an entry of the runner's ``cached`` listing,
    workflows/sources/cached.py) would refuse it as a pickle; else None. The rule and the words are the load's
    (core/model_ids.py ``pickles_trusted``, ``pickle_refused``); what the file would unpickle the runner read."""
    if not cached.get("pickled"):
        return None
    model = parse_model_id(cached["model_id"])
    owners = owner_list(os.environ, "ALLOWED_ARWEAVE_OWNERS")  # the runner's TorchSettings read the same variable
    if pickles_trusted(model, settings.allow_pickled_models, owners):
        return None
    return pickle_refused(cached["model_id"], cached["pickled"])


def resources(service_id: str, info: dict[str, Any], cache_dir: Path | None = None) -> dict[str, Any]:
    model = info.get("model") or {}
    # A workflow of one's own describes what it likes; only a model with a repository is one a node can name.
    models = [ml_model(model)] if model.get("repo") else []
    return {
        "version": SPEC_VERSION,
        "service_id": service_id,
        "compute_capability": [
            {
                "id": "ml",
                "type": "torch",
                "task": [],
                "models": models,
                "cached_models": models,  # the one model is loaded before the service reports ready
                "inference_engine": "torch",
                "inference_engine_version": _version("torch"),
            }
        ],
        "hardware_capabilities": hardware(cache_dir, model.get("gpu")),
        "workflow": info.get("workflow"),
    }


def ml_model(model: dict[str, Any]) -> dict[str, Any]:
    """The node's MLModel (owner, name, repository, storage, files, version, ml_type) plus its Ritual unique id."""
    storage = model.get("source") or "local"
    repository = str(model.get("repo") or "")
    if storage == "local":
        owner, name = "local", Path(repository).parent.name or Path(repository).stem  # models/iris/model.torch: iris
    else:
        owner, _, name = repository.rpartition("/")
    files = [model["file"]] if model.get("file") else []
    version = model.get("revision") or ""
    return {
        "owner": owner,
        "name": name,
        "repository": repository,
        "storage": storage,
        "files": files,
        "version": version,
        "ml_type": "torch",
        "repo_id": unique_id(storage, owner, name, version, files),
        "sha256": model.get("sha256"),
        "format": model.get("format"),
    }


def ml_model_of_id(model_id: str, sha256: str | None = None) -> dict[str, Any]:
    """The node's MLModel for a per-request model named by its canonical id (``ml_model``'s ``repo_id`` is the id
    again). Raises ModelIdError for a malformed id."""
    model = parse_model_id(model_id)
    described = {"source": model.source, "repo": model.repo_id, "file": model.filename, "revision": model.version}
    return ml_model({**described, "sha256": sha256})


def with_per_request_models(
    listing: dict[str, Any], loaded: list[dict[str, Any]], cached: list[dict[str, Any]]
) -> dict[str, Any]:
    """``listing`` (``resources()``) with the per-request models added to the node's ``models`` (loaded now) and
    ``cached_models`` (loaded now or cached verified on disk), each model once."""
    compute = listing["compute_capability"][0]
    for key, entries in (("models", loaded), ("cached_models", [*loaded, *cached])):
        models = list(compute[key])
        seen = {model["repo_id"] for model in models}
        for entry in entries:
            model = ml_model_of_id(entry["model_id"], entry.get("sha256"))
            if model["repo_id"] not in seen:
                seen.add(model["repo_id"])
                models.append(model)
        compute[key] = models
    return listing


def unique_id(storage: str, owner: str, name: str, version: str, files: list[str]) -> str:
    """Ritual's model id: ``{storage}/{owner}/{name}[/{version}][:{file,...}]``."""
    base = "/".join(part for part in (storage, owner, name, version) if part)
    return f"{base}:{','.join(files)}" if files else base


def supports(model_id: str, info: dict[str, Any]) -> bool:
    """Whether ``model_id`` names the model this container serves: its Ritual id (with or without version and
    files), its repository, its file name or its sha256."""
    model = info.get("model") or {}
    if not model.get("repo"):
        return False
    ours = ml_model(model)
    base, _, files = model_id.strip().partition(":")
    if files and not set(files.split(",")) & set(ours["files"]):
        return False
    unversioned = "/".join(p for p in (ours["storage"], ours["owner"], ours["name"]) if p)
    names = {ours["repo_id"].partition(":")[0], unversioned, ours["repository"], model.get("file"), model.get("sha256")}
    return base in names - {None, ""}


def hardware(cache_dir: Path | None, model_gpu: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    capabilities: list[dict[str, Any]] = [
        {
            "capability_id": "base",
            "os_info": {"name": platform.system(), "version": platform.version()},
            "cpu_info": _cpu(),
            "disk_info": _disks([Path("/"), *([cache_dir] if cache_dir else [])]),
        }
    ]
    gpu = _gpu() or _model_gpu(model_gpu)
    if gpu:
        capabilities.append(gpu)
    return capabilities


def _cpu() -> dict[str, Any]:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() in ("model name", "vendor_id") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return {
        "model": fields.get("model name") or platform.processor(),
        "architecture": platform.machine(),
        "byte_order": f"{sys.byteorder.capitalize()} Endian",
        "vendor_id": fields.get("vendor_id", ""),
        "num_cores": os.cpu_count() or 0,
        "cores": [],
    }


def _disks(paths: list[Path]) -> list[dict[str, Any]]:
    disks: dict[str, dict[str, Any]] = {}
    for path in paths:
        existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
        mount = _mount_point(existing)
        if mount in disks:
            continue
        usage = shutil.disk_usage(mount)
        disks[mount] = {
            "filesystem": _filesystem(mount),
            "mount_point": mount,
            "size": usage.total,
            "used": usage.used,
            "available": usage.free,
        }
    return list(disks.values())


def _mount_point(path: Path) -> str:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def _filesystem(mount: str) -> str:
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, point, *_ = line.split()
            if point == mount:
                return device
    except (OSError, ValueError):
        pass
    return "unknown"


def _gpu() -> dict[str, Any] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-q", "-x"], capture_output=True, text=True, timeout=10, check=True).stdout
        root = ET.fromstring(out)
    except (OSError, subprocess.SubprocessError, ET.ParseError):
        return None
    return {
        "capability_id": "gpu",
        "driver_version": root.findtext("driver_version") or "N/A",
        "cuda_version": root.findtext("cuda_version") or "N/A",
        "gpu_info": [
            {
                "name": gpu.findtext("product_name") or "N/A",
                "memory_total": _bytes(gpu.findtext("fb_memory_usage/total")),
                "memory_used": _bytes(gpu.findtext("fb_memory_usage/used")),
                "cuda_device_id": _int(gpu.findtext("minor_number")),
            }
            for gpu in root.findall("gpu")
        ],
    }


def _model_gpu(gpu: dict[str, Any] | None) -> dict[str, Any] | None:
    """The runner's own figures for the model's GPU (workflows/torch_workflow.py ``gpu_info``, cudaMemGetInfo), for
    images without nvidia-smi: the API workers never import torch, so they come with /info's model description."""
    if not isinstance(gpu, dict):
        return None
    return {
        "capability_id": "gpu",
        "driver_version": "N/A",  # torch does not report the driver's version
        "cuda_version": gpu.get("cuda_version") or "N/A",
        "gpu_info": [
            {
                "name": gpu.get("name") or "N/A",
                "memory_total": int(gpu.get("memory_total_bytes") or 0),
                "memory_used": int(gpu.get("memory_used_bytes") or 0),
                "cuda_device_id": int(gpu["index"]) if isinstance(gpu.get("index"), int) else -1,
            }
        ],
    }


def _bytes(text: str | None) -> int:
    """nvidia-smi's "81559 MiB" -> bytes."""
    try:
        value, unit = (text or "").split()
        return int(value) * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}.get(unit, 1)
    except ValueError:
        return 0


def _int(text: str | None) -> int:
    try:
        return int(text or "")
    except ValueError:
        return -1


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
