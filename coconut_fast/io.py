"""Writing files and directories so that readers only ever see whole ones, and a crash loses nothing written.

Each published file is fsynced before it is renamed into place, and its directory after, so a rename that
reached the disk names complete data. Published files get the mode a plain `open()` would give them (0666 less
the umask), whatever mode the staging area had.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path

RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux 3.15+)
AT_FDCWD = -100


def current_umask() -> int:
    """The process umask, read without changing it where /proc tells it (else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root`, `root` last."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def set_default_modes(root: Path) -> None:
    """Give `root` and everything under it the modes `open()` and `mkdir()` would (a temporary directory is 0700,
    safetensors writes 0600)."""
    umask = current_umask()
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            os.chmod(Path(folder) / name, 0o666 & ~umask)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `path` through a temporary file beside it: readers see the old or the new contents, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def publish_files(staging: Path, target: Path) -> list[Path]:
    """Move every file under `staging` to the same relative path under `target`, one atomic rename each (both
    must be on one file system: make `staging` inside `target`). Other files of `target` stay. Returns the
    published paths."""
    mode = 0o666 & ~current_umask()
    published, folders = [], {target}
    for folder, _, files in os.walk(staging):
        for name in sorted(files):
            source = Path(folder) / name
            dest = target / source.relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fsync_path(source)
            os.chmod(source, mode)
            os.replace(source, dest)
            published.append(dest)
            folders.add(dest.parent)
    for folder in folders:
        fsync_path(folder)
    return published


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def publish_directory(tmp: Path, target: Path) -> None:
    """Put the finished directory `tmp` at `target`, its files fsynced first. An existing `target` is swapped
    with it in one atomic exchange where the system has one (so `target` always names a whole directory, the old
    one or the new one), else moved aside first; the old copy is removed after."""
    set_default_modes(tmp)
    fsync_tree(tmp)
    if target.exists():
        if not target.is_dir():
            raise NotADirectoryError(f"{target} exists and is not a directory")
        if _exchange(tmp, target):
            fsync_path(target.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
            return
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        fsync_path(target.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, target)
    fsync_path(target.parent)
