"""A lease on one day of the daily job, in a file every host sees (the shared ``daily.run_root``).

The lease names its owner (host and pid, and a random token), and carries a heartbeat and an expiry. The owner
renews it every ``heartbeat_s`` from a background thread; a lease whose expiry has passed belongs to a run that
died (or a host that lost the volume) and is taken over, saying so. A PID alone means nothing on another host, so
liveness is judged by the heartbeat only. Times are wall-clock seconds of the hosts: keep their clocks in sync
(NTP) and ``ttl_s`` well above any skew.

Creating the lease is atomic on local and network file systems: the content is written to a private file first and
hard-linked into place (``link`` fails when the name exists). Taking over renames the stale file away and checks it
was the stale one (a racing host may have renewed or replaced it in between), putting it back otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.logs import notice

#: Overrides the host name written as the lease's owner (e.g. a pod name where host names repeat).
OWNER_ENV = "MTREC_LEASE_OWNER"


class LeaseHeldError(RuntimeError):
    """Another live run holds the lease."""

    def __init__(self, path: Path, holder: LeaseInfo) -> None:
        left = holder.expires_at - time.time()
        super().__init__(
            f"{path.name}: held by host {holder.host} pid {holder.pid} (heartbeat "
            f"{time.time() - holder.heartbeat_at:.0f}s ago, expires in {left:.0f}s unless renewed)"
        )
        self.holder = holder


class LeaseLostError(RuntimeError):
    """The lease was taken over while this run still worked under it."""


@dataclass(frozen=True)
class LeaseInfo:
    host: str
    pid: int
    token: str
    acquired_at: float
    heartbeat_at: float
    expires_at: float

    def describe(self) -> str:
        return (
            f"host {self.host} pid {self.pid} (last heartbeat {_iso(self.heartbeat_at)}, expired "
            f"{_iso(self.expires_at)})"
        )


def owner_host() -> str:
    return os.environ.get(OWNER_ENV) or socket.gethostname()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def read_lease(path: Path) -> LeaseInfo | None:
    """The lease in ``path``; None when there is none. A file that is not a lease counts as expired."""
    try:
        text = path.read_text()
        stat = path.stat()
    except FileNotFoundError:
        return None
    try:
        data: dict[str, Any] = json.loads(text)
        return LeaseInfo(**data)
    except (ValueError, TypeError):
        # Not a lease this code wrote (or a torn write on a broken file system): expire it from its mtime.
        return LeaseInfo("unknown", 0, "", stat.st_mtime, stat.st_mtime, stat.st_mtime)


class Lease:
    """A held lease; renewed by a daemon thread until :meth:`release`."""

    def __init__(self, path: Path, info: LeaseInfo, ttl_s: float, heartbeat_s: float) -> None:
        self.path, self.info, self.ttl_s, self.heartbeat_s = path, info, ttl_s, heartbeat_s
        self.lost_to: LeaseInfo | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{path.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.renew()

    def renew(self) -> None:
        current = read_lease(self.path)
        if current is None or current.token != self.info.token:
            self.lost_to = current
            self._stop.set()
            return
        now = time.time()
        self.info = LeaseInfo(**{**asdict(self.info), "heartbeat_at": now, "expires_at": now + self.ttl_s})
        tmp = self.path.with_name(f".{self.path.name}.{self.info.token}.tmp")
        tmp.write_text(json.dumps(asdict(self.info)))
        os.replace(tmp, self.path)

    def ensure_held(self) -> None:
        """Raise :class:`LeaseLostError` when another run has taken the lease over (this one stalled past expiry)."""
        current = read_lease(self.path)
        if self.lost_to is not None or current is None or current.token != self.info.token:
            holder = self.lost_to or current
            who = f"host {holder.host} pid {holder.pid}" if holder else "nobody (the lease file is gone)"
            raise LeaseLostError(f"{self.path.name}: lease lost to {who}; stopping before anything is registered")

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        current = read_lease(self.path)
        if current is not None and current.token == self.info.token:
            self.path.unlink(missing_ok=True)


def _try_create(path: Path, info: LeaseInfo) -> bool:
    tmp = path.with_name(f".{path.name}.{info.token}.tmp")
    tmp.write_text(json.dumps(asdict(info)))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(path: Path, stale: LeaseInfo, token: str) -> bool:
    """Move the stale lease away; False when what was moved is not the stale lease (put back) or is gone."""
    moved = path.with_name(f".{path.name}.{token}.stale")
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return False
    now_moved = read_lease(moved)
    if now_moved is not None and now_moved.token == stale.token and now_moved.heartbeat_at == stale.heartbeat_at:
        moved.unlink(missing_ok=True)
        return True
    with contextlib.suppress(FileExistsError):
        os.link(moved, path)  # someone renewed or replaced it meanwhile: restore it, unless the slot is taken again
    moved.unlink(missing_ok=True)
    return False


def acquire(
    path: Path,
    ttl_s: float,
    heartbeat_s: float,
    wait_s: float = 0.0,
    poll_s: float = 2.0,
    say: Callable[[str], None] = notice,
) -> Lease:
    """Take the lease in ``path``, waiting up to ``wait_s`` for a live holder; raises :class:`LeaseHeldError`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    waiting_said = False
    stale: LeaseInfo | None = None
    while True:
        now = time.time()
        info = LeaseInfo(owner_host(), os.getpid(), token, now, now, now + ttl_s)
        if _try_create(path, info):
            if stale is not None:
                say(f"[lease] {path.name}: took over the expired lease of {stale.describe()}")
            return Lease(path, info, ttl_s, heartbeat_s)
        holder = read_lease(path)
        if holder is None:
            continue  # released between our attempt and the read
        if holder.expires_at < time.time():
            if _take_over(path, holder, token):
                stale = holder
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LeaseHeldError(path, holder)
        if not waiting_said:
            say(f"[lease] {path.name}: held by host {holder.host} pid {holder.pid}; waiting up to {wait_s:.0f}s")
            waiting_said = True
        time.sleep(min(poll_s, remaining))


@contextlib.contextmanager
def held(
    path: Path, ttl_s: float, heartbeat_s: float, wait_s: float = 0.0, say: Callable[[str], None] = notice
) -> Iterator[Lease]:
    lease = acquire(path, ttl_s, heartbeat_s, wait_s, say=say)
    try:
        yield lease
    finally:
        lease.release()
