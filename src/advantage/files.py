"""Atomic writes: a file or a directory is written under a temporary name beside its place and renamed in,
so a reader (or the next start, after a crash) sees the old whole or the new whole, never half of one.

What is written is fsynced before the rename and the parent directory after it, so the rename itself
survives a power cut too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` via a uniquely named `.<name>.*.tmp` sibling, so concurrent writers
    (threads or processes) never share a temporary file and the last rename wins whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_entry(path.parent)


def write_dir_atomic(final: Path, write: Callable[[Path], None], tmp_prefix: str, aside_prefix: str) -> Path:
    """Create or replace the directory `final`: `write(tmp)` fills a new `<tmp_prefix>*` sibling, whose files
    are fsynced and which is then renamed to `final`.

    An existing `final` is first renamed aside to `<aside_prefix>*` (the same random tail as the temporary
    dir) and deleted only once the new one is in place. If that rename in fails, the old dir is put back;
    a process killed in between leaves it aside for the caller's next start to restore. Returns `final`.
    """
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=parent))
    old: Path | None = None
    try:
        write(tmp)
        fsync_files(tmp)
        if final.exists():  # the old dir steps aside until the new one is in
            old = parent / (aside_prefix + tmp.name.removeprefix(tmp_prefix))
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_entry(parent)  # make the renames themselves durable
    except BaseException:
        if old is not None and not final.exists():
            os.rename(old, final)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return final


def fsync_files(directory: Path) -> None:
    """fsync every file directly in `directory` (not in its subdirectories)."""
    for p in directory.iterdir() if directory.is_dir() else []:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def fsync_entry(directory: Path) -> None:
    """fsync `directory` itself, so the names created, renamed or removed in it are durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
