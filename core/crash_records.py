"""What the processes of one ``bentoml serve`` tell each other about the runner's deaths (public/runner_client.py
``CrashWatch``): the digests of suspects and poisons every API worker learned, and which suspects sent alone were
still waiting for the model (not running) when the runner's process died.

Where: a directory the server's main process creates before any worker starts (``create_for_this_server``), named in
the workers' environment, removed when the server exits (and when a worker stops it at start-up). ``mkdtemp`` names
it (``infernet-crashes.<host>.<pid>.<random>``), so two servers, even on one ``BENTOML_HOME`` or one ``/tmp``, never
share one; a server killed before it could remove its own leaves it to the next one on the host (core/leftovers.py).
Without it (the app run in-process, as unit tests do) each API worker remembers alone, as before.

Why it is safe with writers in separate processes:
  - ``records.json`` (the suspects and poisons, digests and expiry times only, never a request's data) is only ever
    replaced whole: a writer writes a new file and ``os.replace`` moves it in, so a reader sees the old file or the
    new one, never a mixture. Writers take an exclusive ``flock`` first, so two workers that learn something at the
    same death both keep what the other wrote (read, merge, replace under the lock).
  - ``changes`` holds an 8-byte counter, mapped into every API worker's memory: a writer adds one (under the lock)
    after its replace. A worker compares it with the value it last read before each request: a memory read, no
    system call. Only when it differs is ``records.json`` read, and the counter is read before the file, so a write
    that lands in between changes the counter again and is read at the next request. A torn read of the counter only
    makes an extra read of the file.
  - Times are ``time.monotonic()``: on Linux ``CLOCK_MONOTONIC``, one clock for every process of a host.
  - ``waiting-<digest>`` files: the runner creates one when it queues a call marked ``alone`` and removes it when its
    model thread takes the call, before the forward; a new runner removes any left by the one that died. So a marker
    that exists when the process dies means that request had not started: its own forward did not kill the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

from core import leftovers

_PREFIX = "infernet-crashes."
# Set by the server's main process for its workers; not an operator's setting.
_DIRECTORY = "INFERNET_CRASH_RECORDS_DIR"
_COUNTER_BYTES = 8

Remembered = dict[bytes, float]  # digest -> when it is forgotten (time.monotonic()), in the order they expire


def create_for_this_server() -> Path:
    """In the server's main process, before the workers start: this server's directory, with its counter, named in the
    environment the workers inherit and removed at exit (``remove``). Raises OSError if it cannot be created."""
    parent = Path(tempfile.gettempdir())
    leftovers.remove_dead(parent, _PREFIX, random_tail=True)  # those of servers killed before their exit handlers ran
    # Host and pid in the name: the next server on this host can tell whether this one still lives.
    directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{leftovers.owner_tag()}.", dir=parent))
    (directory / "changes").write_bytes(bytes(_COUNTER_BYTES))
    os.environ[_DIRECTORY] = str(directory)
    return directory


def remove() -> None:
    """In the server's main process, at exit: remove this server's directory (nothing when there is none). Raises
    nothing."""
    directory = os.environ.get(_DIRECTORY)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


def this_server() -> Path | None:
    """In a worker: its server's directory; None outside ``bentoml serve`` or once the directory is gone."""
    directory = os.environ.get(_DIRECTORY)
    if directory and os.path.isfile(os.path.join(directory, "changes")):
        return Path(directory)
    return None


class SharedRecords:
    """The suspects and poisons of every API worker of one server (``records.json`` and the ``changes`` counter in
    its directory). Used on an API worker's event loop; each call is a few system calls on a file of at most
    ``2 * max_remembered`` entries, and only ``changes()`` is called per request."""

    def __init__(self, directory: Path) -> None:
        self._records = directory / "records.json"
        self._lock = os.open(directory / "changes", os.O_RDWR)
        self.counter = mmap.mmap(self._lock, _COUNTER_BYTES)

    def changes(self) -> bytes:
        """The counter of writes, as bytes: compare with the value of the last ``read``."""
        return self.counter[:_COUNTER_BYTES]

    def read(self) -> tuple[bytes, Remembered, Remembered]:
        """The counter, then the suspects and the poisons as they are now."""
        seen = self.changes()
        suspects, poison = self._load()
        return seen, suspects, poison

    def update(
        self, change: Callable[[Remembered, Remembered], None], max_remembered: int
    ) -> tuple[bytes, Remembered, Remembered]:
        """Apply ``change`` to the suspects and poisons under the lock, dropping what has expired and the oldest
        beyond ``max_remembered`` of each; returns them as ``read`` does. Raises OSError if the file cannot be
        written."""
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            suspects, poison = self._load()
            change(suspects, poison)
            now = time.monotonic()
            suspects, poison = (_kept(r, now, max_remembered) for r in (suspects, poison))
            text = json.dumps({"suspects": _hex(suspects), "poison": _hex(poison)})
            fd, temporary = tempfile.mkstemp(dir=self._records.parent, prefix=".records.")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(temporary, self._records)
            count = int.from_bytes(self.counter[:_COUNTER_BYTES], "little") + 1
            self.counter[:_COUNTER_BYTES] = (count % 2 ** (8 * _COUNTER_BYTES)).to_bytes(_COUNTER_BYTES, "little")
            return self.counter[:_COUNTER_BYTES], suspects, poison
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def _load(self) -> tuple[Remembered, Remembered]:
        try:
            stored = json.loads(self._records.read_bytes())
        except (FileNotFoundError, ValueError):  # nothing written yet
            return {}, {}
        return (
            {bytes.fromhex(k): until for k, until in stored["suspects"]},
            {bytes.fromhex(k): until for k, until in stored["poison"]},
        )


def _kept(remembered: Remembered, now: float, most: int) -> Remembered:
    alive = sorted(((until, key) for key, until in remembered.items() if until > now))[-most:]
    return {key: until for until, key in alive}


def _hex(remembered: Remembered) -> list[tuple[str, float]]:
    return [(key.hex(), until) for key, until in remembered.items()]


# The runner's side: which calls marked ``alone`` are waiting for the model thread.


def waiting(directory: Path | None, keys: Iterable[bytes]) -> list[Path]:
    """In the runner, on its event loop, as a call marked ``alone`` is queued: a marker per request's digest, removed
    by ``taken`` when the model thread takes the call. Raises nothing: without a marker the API worker takes the
    request for one that was running (as it did before markers)."""
    if directory is None:
        return []
    made = []
    for key in keys:
        path = directory / f"waiting-{key.hex()}"
        with contextlib.suppress(OSError):
            path.touch()
            made.append(path)
    return made


def taken(markers: list[Path]) -> None:
    """In the runner's model thread, before the forward of a call ``waiting`` marked. Raises nothing."""
    for path in markers:
        with contextlib.suppress(OSError):
            path.unlink()


def forget_waiting(directory: Path | None) -> None:
    """In a new runner, before it takes calls: the markers of the process that died mean nothing now."""
    if directory is not None:
        for path in directory.glob("waiting-*"):
            with contextlib.suppress(OSError):
                path.unlink()


def was_waiting(directory: Path | None, key: bytes) -> bool:
    """In an API worker, when the runner died while its call marked ``alone`` was in it: whether that request was
    still queued for the model thread (its marker is there), so it was not what killed the process."""
    return directory is not None and (directory / f"waiting-{key.hex()}").exists()


def request_digest(item: Any) -> bytes:
    """A digest of one request's item for the runner (its data, or a ``ForModel``): equal data, equal digest,
    whatever the order of its JSON keys. Computed only while ``CrashWatch`` remembers a death, and in the runner for
    a call marked ``alone``."""
    try:
        text = orjson.dumps(item, default=_canonical, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError:  # not JSON-like (integers beyond 64 bits, a custom workflow's objects)
        text = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return hashlib.blake2b(text, digest_size=16).digest()


def _canonical(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return value.hex()
    if hasattr(value, "dtype") and hasattr(value, "tobytes"):  # numpy arrays and scalars (CHAIN data)
        return [str(value.dtype), list(getattr(value, "shape", ())), hashlib.blake2b(value.tobytes()).hexdigest()]
    raise TypeError(type(value).__name__)
