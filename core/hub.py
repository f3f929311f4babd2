"""The Hugging Face Hub's answers, as the service words them: a failure of ``huggingface_hub`` as a one-line
``FetchError`` with its status (``refusal``), and whether a version is one the repository's owners published
(``check_published_revision``, ``check_version_published``).

Here, not in workflows/sources/huggingface.py, because two processes ask: the runner before a per-request download
(workflows/per_request.py) and the API workers for ``/service-resources?model_id=`` (public/resources.py), which
must not import the workflows (no torch in the API workers). Blocking: call it on a thread, never on an event loop.
``huggingface_hub`` is imported inside the functions, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable

from core.errors import FetchError, first_line, unwritable
from core.model_ids import parse_model_id, version_spelled_out
from core.settings import boolean, env_value

log = logging.getLogger("core.hub")
TOKEN_VARS = "HF_TOKEN / HUGGING_FACE_HUB_TOKEN"
HF_CACHE_FIX = "set HF_HOME (or HF_HUB_CACHE) to a writable directory"
_ADDRESS = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s)'\"]+")


def without_addresses(reason: str) -> str:
    """``reason`` as an anonymous client may read it: the URLs of the operator's Hub or gateway (HF_ENDPOINT,
    ARWEAVE_GATEWAY, often an internal mirror) left out."""
    return _ADDRESS.sub("(its address)", reason)


def check_version_published(model_id: str, allowed_models: Iterable[str], hf_token: str | None) -> None:
    """Refuse a Hugging Face version that no ALLOWED_MODELS pattern spells out and that is neither a branch nor a tag
    nor the commit of one (a pull request's commit): a pattern's "every version" means the published ones. Nothing
    to check for other ids. One refs request to the Hub, no download, so ``/service-resources?model_id=`` asks the
    same question a request would. Raises FetchError, its text the client's (``model <id>: <why>``, no addresses):
    403 not published (naming the pattern to add), 404/403 the Hub's refusals, 502 the Hub cannot be asked."""
    model = parse_model_id(model_id)
    if model.source != "huggingface" or not model.version or version_spelled_out(model, tuple(allowed_models)):
        return
    try:
        check_published_revision(model.repo_id, model.version, hf_token, model_id)
    except FetchError as e:
        log.log(logging.INFO if e.status < 500 else logging.WARNING, "model %s: %s", model_id, first_line(e))
        raise FetchError(f"model {model_id}: {without_addresses(first_line(e))}", e.status) from None


def refusal(error: Exception, token: str | None, offline: bool, endpoint: str) -> FetchError:
    """The one-line FetchError for a failure of ``huggingface_hub``, its status taken from the exception's type
    (and the Hub's HTTP status): 404 not there, 403 refused token or gate, 502 anything else."""
    from huggingface_hub import errors

    have_token = "a token is set" if token else f"no token is set ({TOKEN_VARS})"
    if isinstance(error, errors.GatedRepoError):
        return FetchError(f"gated repository: access has not been granted to this token ({have_token})", 403)
    if isinstance(error, errors.RepositoryNotFoundError):
        return FetchError(f"repository not found, or private and not visible to this token ({have_token})", 404)
    if isinstance(error, errors.RevisionNotFoundError):
        return FetchError("revision not found in the repository", 404)
    if isinstance(error, errors.LocalEntryNotFoundError):  # a subclass of EntryNotFoundError: the cache's miss
        if offline:
            return FetchError("HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache")
        return FetchError(f"the Hub at {endpoint} cannot be reached and the file is not in the Hugging Face cache")
    if isinstance(error, errors.EntryNotFoundError):
        return FetchError("file not found in the repository", 404)
    if isinstance(error, errors.HFValidationError):  # the repo id or revision breaks the Hub's naming rules
        return FetchError(f"invalid Hugging Face name: {first_line(error)}", 400)
    if isinstance(error, errors.HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            return FetchError(f"the Hub refused the token: invalid credentials ({TOKEN_VARS})", 403)
        if status == 403:
            return FetchError(f"access denied by the Hub (HTTP 403; {have_token})", 403)
        return FetchError(f"the Hub answered HTTP {status}")
    if isinstance(error, OSError) and error.filename is not None:  # the cache's disk, not the Hub (500: ours)
        return FetchError(f"the Hugging Face cache is not writable: {unwritable(error)}; {HF_CACHE_FIX}", 500)
    return FetchError(f"{type(error).__name__}: {first_line(error)}")  # first_line masks the token


def check_published_revision(repo_id: str, revision: str, token: str | None, model_id: str) -> None:
    """Refuse a ``revision`` of ``repo_id`` that is not a branch, a tag, or the commit a branch or tag points at.

    On a runner download thread, before any download, for a per-request id whose version no ALLOWED_MODELS pattern
    spells out: anyone can open a pull request on a public repository, and its commits (reachable only from
    ``refs/pr/N``) are then served by sha; this keeps "every version" to what the repository's owners published.
    One ``GET /api/models/{repo_id}/refs`` without pull requests (what ``HfApi.list_repo_refs`` asks), at the
    endpoint ``fetch`` uses, within ``HF_HUB_ETAG_TIMEOUT`` seconds (10 by default). Raises FetchError: 403 not
    published (the message names the pattern that allows it), 404/403 the Hub's refusals as ``fetch`` maps them,
    502 the Hub cannot be asked (HF_HUB_OFFLINE, unreachable): refused rather than allowed, since nothing else can
    tell a pull request's commit from a published one.
    """
    from huggingface_hub import constants, errors, get_session
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, validate_repo_id

    hub = env_value(os.environ, "HF_ENDPOINT").rstrip("/") or constants.ENDPOINT
    fix = f"add {model_id.partition(':')[0]} (the version written out) to ALLOWED_MODELS to allow it"
    if constants.is_offline_mode() or boolean(os.environ, "HF_HUB_OFFLINE", False):
        raise FetchError(f"HF_HUB_OFFLINE is set: cannot check that version {revision} is published; {fix}")
    try:
        # HfApi.list_repo_refs's request, with a time limit (the library's session has none): the same URL, the
        # library's headers (token, user agent) and its error mapping.
        validate_repo_id(repo_id)
        response = get_session().get(
            f"{hub}/api/models/{repo_id}/refs",
            headers=build_hf_headers(token=token),
            timeout=constants.HF_HUB_ETAG_TIMEOUT,
        )
        hf_raise_for_status(response)
        refs = response.json()
        listed = [*refs["branches"], *refs["tags"]]
        published = {ref["name"] for ref in listed} | {ref["targetCommit"] for ref in listed}
    except (errors.HfHubHTTPError, errors.HFValidationError) as e:
        raise refusal(e, token, False, hub) from None
    except Exception as e:  # no HTTP answer (refused connection, timeout, DNS, proxy) or not the Hub's JSON
        raise FetchError(
            f"the Hub at {hub} cannot be asked whether version {revision} is published "
            f"({type(e).__name__}: {first_line(e)}); {fix}"
        ) from None
    if revision not in published:
        raise FetchError(
            f"version {revision} is not a branch, a tag or the commit of one (a pull request's commit?); "
            f"ALLOWED_MODELS allows every published version only: {fix}",
            403,
        )
