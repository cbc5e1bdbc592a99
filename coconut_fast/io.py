"""Writing directories so that readers only ever see a whole one."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish_directory(tmp: Path, target: Path) -> None:
    """Put the finished directory `tmp` at `target`: an existing one is moved aside first and removed
    after, so `target` is always a whole directory, the old one or the new one."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    fd = os.open(target.parent, os.O_RDONLY)  # the renames reach the disk before the old copy goes
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
