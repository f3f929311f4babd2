"""A small Hugging Face Hub stand-in for the tests: real git repositories served over HTTP on 127.0.0.1.

It speaks the part of the Hub protocol that ``huggingface_hub.hf_hub_download`` uses, so the unmodified client
talks to it over real TCP:

* ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{path}``: ``X-Repo-Commit`` (the commit the revision resolves to)
  and ``ETag`` (the git blob id). Large-file-style paths (``LFS_SUFFIXES``) answer as the Hub answers for LFS
  files: a 302 to a second "CDN" origin with ``X-Linked-Etag`` = the file's sha256 and ``X-Linked-Size``; the client
  then downloads from the CDN without the ``Authorization`` header.
* Errors carry ``X-Error-Code`` like the Hub's: ``RepoNotFound`` (401, also for a private repo without a valid
  token), ``GatedRepo`` (403), ``RevisionNotFound`` and ``EntryNotFound`` (404). An unknown token gets 401
  "Invalid credentials in Authorization header".
* ``GET /api/models/{org}/{name}/refs``: the repository's branches and tags (``pullRequests`` only with
  ``include_prs=1``), as ``huggingface_hub.list_repo_refs`` reads them.
* Every request is recorded (method, path, whether a token came with it), so tests can count downloads.

What it is not: it re-implements the Hub's answers from what the client reads, so it cannot show that the real
Hub still answers this way. The client is the pinned huggingface_hub; its own error mapping is what is tested.

Run alone: ``python tests/hubserver.py --repo org/name=GITDIR[:private|:gated] --token T``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".torch", ".pt", ".pt2", ".bin", ".safetensors")


@dataclass
class Repo:
    git_dir: Path
    visibility: str = "public"  # public | private | gated
    tamper_cdn: bool = False  # the CDN serves altered bytes for this repo's large files
    stated_size: int | None = None  # the Hub states this X-Linked-Size for large files, whatever their real size
    cdn_seconds: float = 0.0  # the CDN trickles this repo's large files over this long (a slow download)


@dataclass
class Request:
    method: str
    path: str
    authorized: bool


@dataclass
class Hub:
    repos: dict[str, Repo]
    tokens: frozenset[str] = frozenset()  # tokens that may read private repos (no token is granted gated ones)
    log: list[Request] = field(default_factory=list)
    url: str = ""
    cdn_url: str = ""
    _blobs: dict[str, bytes] = field(default_factory=dict)
    _slow: dict[str, float] = field(default_factory=dict)  # sha256 -> seconds the CDN takes to send it
    _servers: list[ThreadingHTTPServer] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Hub:
        hub_server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=False))
        cdn_server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, cdn=True))
        for server in (hub_server, cdn_server):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self._servers.append(server)
        self.url = f"http://127.0.0.1:{hub_server.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{cdn_server.server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def downloads(self, filename: str) -> int:
        """GETs that returned a file's bytes (from the Hub or the CDN) so far."""
        with self._lock:
            return sum(1 for r in self.log if r.method == "GET" and r.path.endswith("/" + filename))

    def record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)


def _git(git_dir: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "--git-dir", str(git_dir), *args], capture_output=True, check=False)


def _handler(hub: Hub, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet; the hub keeps its own log
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = urlsplit(self.path).path
            token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip() or None
            hub.record(Request(self.command, path, token is not None))
            if cdn:
                return self._cdn(path, body)
            parts = [unquote(p) for p in path.strip("/").split("/")]
            if len(parts) == 5 and parts[:2] == ["api", "models"] and parts[4] == "refs":
                return self._refs(f"{parts[2]}/{parts[3]}", token, "include_prs=1" in urlsplit(self.path).query, body)
            if len(parts) < 5 or parts[2] != "resolve":
                return self._answer(404, {"X-Error-Message": "not found"}, b"", body)
            repo_id, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            if token is not None and token not in hub.tokens:
                return self._answer(401, {"X-Error-Message": "Invalid credentials in Authorization header"}, b"", body)
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.visibility == "private" and token is None):
                return self._error(401, "RepoNotFound", "Repository not found", body)
            if repo.visibility == "gated":
                return self._error(403, "GatedRepo", "Access to this gated repo is restricted", body)
            commit = _git(repo.git_dir, "rev-parse", "--verify", "-q", f"{revision}^{{commit}}").stdout.decode().strip()
            if not commit:
                return self._error(404, "RevisionNotFound", "Invalid rev id", body)
            found = _git(repo.git_dir, "cat-file", "blob", f"{commit}:{filename}")
            if found.returncode != 0:
                return self._error(404, "EntryNotFound", "Entry not found", body, {"X-Repo-Commit": commit})
            data = found.stdout
            blob_id = _git(repo.git_dir, "rev-parse", f"{commit}:{filename}").stdout.decode().strip()
            headers = {"X-Repo-Commit": commit, "ETag": f'"{blob_id}"'}
            if filename.endswith(LFS_SUFFIXES):
                sha256 = hashlib.sha256(data).hexdigest()
                served = bytes([data[0] ^ 0xFF]) + data[1:] if repo.tamper_cdn else data
                with hub._lock:
                    hub._blobs[sha256] = served
                    if repo.cdn_seconds:
                        hub._slow[sha256] = repo.cdn_seconds
                location = (
                    f"{hub.cdn_url}/blobs/{sha256}/{filename.rsplit('/', 1)[-1]}?expires={int(time.time()) + 3600}"
                )
                headers.update(
                    {
                        "X-Linked-Etag": f'"{sha256}"',
                        "X-Linked-Size": str(repo.stated_size or len(data)),
                        "Location": location,
                    }
                )
                return self._answer(302, headers, b"", body)
            self._answer(200, headers, data, body)

        def _refs(self, repo_id: str, token: str | None, include_prs: bool, body: bool) -> None:
            """``GET /api/models/{repo}/refs``: branches and tags (and ``refs/pr/N`` only with ``include_prs=1``)."""
            if token is not None and token not in hub.tokens:
                return self._answer(401, {"X-Error-Message": "Invalid credentials in Authorization header"}, b"", body)
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.visibility == "private" and token is None):
                return self._error(401, "RepoNotFound", "Repository not found", body)
            listed = _git(repo.git_dir, "for-each-ref", "--format=%(refname) %(objectname) %(*objectname)")
            answer: dict[str, list[dict[str, str]]] = {"branches": [], "converts": [], "tags": []}
            if include_prs:
                answer["pullRequests"] = []
            for line in listed.stdout.decode().splitlines():
                ref, target, peeled = [*line.split(" "), ""][:3]
                kind = {"refs/heads/": "branches", "refs/tags/": "tags", "refs/pr/": "pullRequests"}
                for prefix, key in kind.items():
                    if ref.startswith(prefix) and key in answer:
                        name = ref.removeprefix("refs/" if key == "pullRequests" else prefix)
                        answer[key].append({"name": name, "ref": ref, "targetCommit": peeled or target})
            data = json.dumps(answer).encode()
            self._answer(200, {"Content-Type": "application/json"}, data, body)

        def _cdn(self, path: str, body: bool) -> None:
            parts = path.strip("/").split("/")
            with hub._lock:
                data = hub._blobs.get(parts[1]) if len(parts) >= 2 and parts[0] == "blobs" else None
                seconds = hub._slow.get(parts[1], 0.0) if data is not None else 0.0
            if data is None:
                return self._answer(404, {}, b"", body)
            self._answer(200, {"ETag": f'"{parts[1]}"'}, data, body, seconds)

        def _error(self, status: int, code: str, message: str, body: bool, extra: dict | None = None) -> None:
            self._answer(status, {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}, b"", body)

        def _answer(self, status: int, headers: dict[str, str], data: bytes, body: bool, seconds: float = 0) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            if status == 200:
                self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if body and seconds:  # 100 pieces, evenly over ``seconds``; a client that goes away ends it
                piece = max(1, -(-len(data) // 100))
                with contextlib.suppress(OSError):
                    for start in range(0, len(data), piece):
                        self.wfile.write(data[start : start + piece])
                        self.wfile.flush()
                        time.sleep(seconds / 100)
            elif body:
                self.wfile.write(data)

    return Handler


def make_repo(
    work_tree: Path,
    commits: list[dict[str, bytes]],
    tags: dict[str, int] | None = None,
    pull_request: dict[str, bytes] | None = None,
) -> Path:
    """A git repository with one commit per dict of {path: content}; ``tags`` names commits by index. Its git dir.

    ``pull_request``: one more commit on top of the last, reachable only from ``refs/pr/1`` (as a Hub pull request
    is: anyone may open one on a public repository); ``main`` stays at the last of ``commits``."""
    work_tree.mkdir(parents=True, exist_ok=True)
    env_args = ["-c", "user.name=test", "-c", "user.email=test@127.0.0.1", "-c", "commit.gpgsign=false"]

    def git(*args: str) -> None:
        subprocess.run(["git", *env_args, "-C", str(work_tree), *args], check=True, capture_output=True)

    git("init", "-q", "-b", "main")
    for index, files in enumerate(commits):
        for name, content in files.items():
            (work_tree / name).parent.mkdir(parents=True, exist_ok=True)
            (work_tree / name).write_bytes(content)
        git("add", "-A")
        git("commit", "-q", "-m", f"commit {index}")
        for tag, at in (tags or {}).items():
            if at == index:
                git("tag", tag)
    if pull_request:
        git("checkout", "-q", "-b", "pr-work")
        for name, content in pull_request.items():
            (work_tree / name).parent.mkdir(parents=True, exist_ok=True)
            (work_tree / name).write_bytes(content)
        git("add", "-A")
        git("commit", "-q", "-m", "pull request 1")
        git("update-ref", "refs/pr/1", "HEAD")
        git("checkout", "-q", "main")
        git("branch", "-q", "-D", "pr-work")
    return work_tree / ".git"


def main() -> None:
    parser = argparse.ArgumentParser(description="serve git repositories the way the Hugging Face Hub does")
    parser.add_argument("--repo", action="append", default=[], help="org/name=GITDIR[:private|:gated]")
    parser.add_argument("--token", action="append", default=[], help="a token that may read private repos")
    args = parser.parse_args()
    repos = {}
    for item in args.repo:
        repo_id, _, rest = item.partition("=")
        git_dir, _, visibility = rest.partition(":")
        repos[repo_id] = Repo(Path(git_dir), visibility or "public")
    hub = Hub(repos, frozenset(args.token)).start()
    print(f"READY {hub.url} {hub.cdn_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
