"""An exclusive lock file that a killed process cannot leave behind for good.

The file holds its owner's pid. A lock whose owner is gone (killed, crashed) is stale and is
taken over; a live owner is waited for up to a timeout, after which the error names the lock
file so a person can remove it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

logger = logging.getLogger(__name__)

# A lock file still without a pid is being written; past this age its writer died first.
_UNWRITTEN_GRACE_S = 10.0


class LockTimeoutError(TimeoutError):
    """Another live process held the lock for longer than the timeout."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_stale(path: Path, owner: int | None) -> bool:
    if owner is None:
        try:
            return time.time() - path.stat().st_mtime > _UNWRITTEN_GRACE_S
        except FileNotFoundError:
            return False
    # Our own pid in a lock we do not hold: left by an earlier process that had this pid.
    return owner == os.getpid() or not _pid_alive(owner)


class PidLock:
    """`with PidLock(path, timeout_s):` holds `path` exclusively among processes."""

    def __init__(self, path: Path, timeout_s: float, poll_s: float = 0.5) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return True

    def __enter__(self) -> PidLock:
        deadline = time.monotonic() + self.timeout_s
        while not self._try_create():
            owner = _owner(self.path)
            if _is_stale(self.path, owner):
                logger.warning("removing stale lock %s (its process %s is gone)", self.path, owner)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"waited {self.timeout_s:.0f} s for the lock {self.path}, held by process "
                    f"{owner}; if that process is not building, delete the lock file"
                )
            time.sleep(self.poll_s)
        return self

    def __exit__(self, *exc) -> None:
        if _owner(self.path) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
