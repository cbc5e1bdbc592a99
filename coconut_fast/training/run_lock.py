"""One trainer per run directory: an exclusive lock on `save_path/name/.lock` for the trainer's life.

Two trainers writing one run directory would replace each other's checkpoints, logs and evaluation files. The
lock is an fcntl `flock` on the lock file, held by the main rank; the kernel drops it when its process ends, so a
run that was killed leaves no lock behind, only the file, which the next trainer takes over. The file records
who holds it, so the second trainer's error names the first.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    def __init__(self, directory: Path, fd: int):
        self.directory, self.fd = directory, fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike) -> "RunLock":
        """Take the directory's lock, or raise RunLockedError naming the process that holds it."""
        directory = Path(directory)
        path = directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"the run directory {directory} is in use by another trainer ({describe(holder)}); wait for it to "
                "finish or stop it, or give this run another `name` or `save_path`") from None
        except BaseException:
            os.close(fd)
            raise
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        return cls(directory, fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(fd: int) -> dict:
    """What the lock file says about its holder ({} when it says nothing readable)."""
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data.decode() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(holder: dict) -> str:
    if not holder:
        return "a process that left no record"
    parts = [f"pid {holder.get('pid', '?')}"]
    if holder.get("host"):
        parts.append(f"on {holder['host']}")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return " ".join(parts)
