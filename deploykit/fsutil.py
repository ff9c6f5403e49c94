"""Filesystem helpers shared by checkpoints and artifacts: atomic folder writes and hashing."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import TargetExistsError


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target`` by rename.

    On any exception (or KeyboardInterrupt) the temporary folder is removed and ``target`` is left
    exactly as it was: an interrupted write never leaves a half-written folder under the target name.
    The temporary folder lives in the same parent so the final ``os.replace`` is a same-filesystem rename.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise TargetExistsError(f"{target} already exists", hint="pass --force (overwrite=True) or choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        # Two renames (old out, new in) keep the window without a complete folder as short as possible.
        old = target.parent / f".{target.name}.old-{tag}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
