"""Filesystem helpers shared by every writer: guarded destinations, atomic folder writes, hashing.

Every command that writes a folder (``convert --out``, ``bench --out``/``--cache``, ``train --out``...)
describes it as a :class:`Destination` and calls ``check()`` before the slow work and ``write()`` for
it. Together they promise that nothing a user typed destroys their work:

- the destination is never the source, inside it, or around it, nor the current folder or one above it;
- an existing folder is replaced only with ``force`` and only if deploykit wrote it (``is_own``: an
  artifact manifest, a run's trainer state, a bench report); an existing file is never replaced;
- writability and free space are checked before the work, not discovered after it;
- the folder is written beside the target and renamed onto it complete (:func:`atomic_folder`), so an
  interrupted or failed write leaves the target as it was; leftovers of killed writers are swept;
- every OSError becomes a one-line :class:`~deploykit.errors.FilesystemError` (exit 5) naming the path.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, FilesystemError, TargetExistsError

# What to do about each errno a write can meet; anything else gets the generic hint.
_HINTS = {
    errno.ENOSPC: "free disk space there (see `df -h`), or choose a destination on another disk",
    errno.EDQUOT: "free space within your disk quota, or choose a destination on another disk",
    errno.EACCES: "choose a folder you can write to, or fix its permissions",
    errno.EPERM: "choose a folder you can write to, or fix its permissions",
    errno.EROFS: "that file system is mounted read-only: choose a destination on a writable one",
    errno.EBUSY: "another process holds it (a mount point, an open editor, a running command): close it or retry",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
}
# Temporary and displaced folders beside a target: .NAME.tmp-PID-HEX and .NAME.old-PID-HEX.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def filesystem_error(e: OSError, path: str | os.PathLike, doing: str, *, own_path: bool = False) -> FilesystemError:
    """``e`` as a one-line error: what deploykit was doing, the path, the reason and the fix.

    The path is the one the OS names in ``e`` (the exact file), unless ``own_path``: then ``path``.
    """
    where = e.filename if e.filename and not own_path else path
    reason = os.strerror(e.errno) if e.errno else str(e)
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    return FilesystemError(f"cannot {doing} {where}: {reason}" + (f" ({name})" if name else ""),
                           hint=_HINTS.get(e.errno, "check the path, its permissions and the free space there"))


@contextlib.contextmanager
def os_errors(path: str | os.PathLike, doing: str) -> Iterator[None]:
    """Turn any OSError raised inside the block into a :class:`FilesystemError` about ``path``."""
    try:
        yield
    except OSError as e:
        raise filesystem_error(e, path, doing) from e


def has_file(*names: str) -> Callable[[Path], bool]:
    """An ``is_own`` test: the folder holds at least one of these files (deploykit's marker files)."""
    return lambda folder: any((folder / n).is_file() for n in names)


@dataclass(frozen=True)
class Destination:
    """A folder a deploykit command is about to write, and the rules it must pass first.

    ``what`` and ``flag`` name it in messages ("artifact", "--out"). ``is_own`` tells a folder deploykit
    wrote (None: no existing non-empty folder is ever replaced). ``sources`` are the inputs of the
    command (the checkpoint, the data): the destination may not be one of them, inside one or around
    one. ``need_bytes`` is the free space the work needs at the destination. ``exists_hint`` replaces
    the default "pass --force" hint (e.g. train's "--resume or --force").
    """

    path: Path
    what: str = "folder"
    flag: str = "--out"
    force: bool = False
    is_own: Callable[[Path], bool] | None = None
    sources: tuple[Path, ...] = ()
    need_bytes: int = 0
    exists_hint: str | None = None
    _resolved: Path = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path).strip():
            raise ConfigError(f"{self.flag}={self.path!r} must be a folder path", hint=f"e.g. {self.flag} out/")
        path = Path(self.path).expanduser()
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "sources", tuple(Path(s).expanduser() for s in self.sources))
        object.__setattr__(self, "_resolved", path.resolve())

    @property
    def label(self) -> str:
        return f"{self.flag} {self.path}"

    def check(self) -> None:
        """Refuse the destination now, before any slow work, if writing it could lose anything."""
        self._check_place()
        self._check_existing()
        self._check_space()
        sweep_leftovers(self.path)

    def check_writable(self) -> None:
        """For a folder that is written into, never replaced (a cache): place, writability, free space."""
        self._check_place()
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.label} is a file; it must be a folder", hint=f"choose a folder for {self.flag}")
        self._check_space(inside=self.path.is_dir())

    @contextlib.contextmanager
    def write(self) -> Iterator[Path]:
        """A temporary folder that becomes ``path`` when the block completes (see :func:`atomic_folder`)."""
        with atomic_folder(self.path, overwrite=self.force, is_own=self.is_own, what=self.what) as tmp:
            yield tmp

    def _check_place(self) -> None:
        target = self._resolved
        cwd = Path.cwd().resolve()
        if target == cwd or target in cwd.parents:
            raise ConfigError(f"{self.label} is the current folder{' or contains it' if target != cwd else ''}: "
                              f"writing the {self.what} there would replace the folder you are working in",
                              hint=f"name a new folder, e.g. {self.flag} {Path('out') / self.what.replace(' ', '-')}")
        for source in self.sources:
            src = source.resolve()
            relation = ("is" if target == src else "is inside" if src in target.parents
                        else "contains" if target in src.parents else None)
            if relation:
                raise ConfigError(f"{self.label} {relation} the source {source}: writing the {self.what} "
                                  "there could replace or mix with the input",
                                  hint=f"choose an {self.flag} outside {source}")

    def _check_existing(self) -> None:
        path = self.path
        if path.is_symlink() and not path.exists():
            raise ConfigError(f"{self.label} is a broken symbolic link", hint="remove the link or choose another path")
        if not path.exists():
            return
        if not path.is_dir():
            raise TargetExistsError(f"{self.label} exists and is a file, not a folder: deploykit never replaces it",
                                    hint=f"choose a folder path for {self.flag}")
        with os_errors(path, "read"):
            empty = next(path.iterdir(), None) is None
        if empty:
            return  # nothing to lose: written into as if it were new
        if self.is_own is None or not self.is_own(path):
            raise TargetExistsError(
                f"{self.label} exists and is not {_a(self.what)} deploykit wrote: it is never replaced, "
                "--force or not", hint=f"choose a new or empty folder for {self.flag}")
        if not self.force:
            raise TargetExistsError(f"{self.label} already exists ({_a(self.what)} deploykit wrote)",
                                    hint=self.exists_hint or f"pass --force to replace it, or choose another {self.flag}")

    def _check_space(self, *, inside: bool = False) -> None:
        """Write and remove a probe folder where the temporary folder will go (or, ``inside``, in the
        folder itself); then compare free space."""
        parent = self.path if inside else _existing_ancestor(self.path.parent if self.path.name else self.path)
        probe = parent / f".{self.path.name or 'out'}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            probe.mkdir()
            probe.rmdir()
            free = shutil.disk_usage(parent).free
        except OSError as e:  # name the folder the user chose, not the probe
            raise filesystem_error(e, parent, f"write the {self.what} ({self.label}) into", own_path=True) from e
        if self.need_bytes and free < self.need_bytes:
            raise FilesystemError(f"cannot write the {self.what} {self.path}: {free / 1e6:,.1f} MB free on its disk, "
                                  f"about {self.need_bytes / 1e6:,.1f} MB needed (ENOSPC)", hint=_HINTS[errno.ENOSPC])


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove ``target``'s temporary/displaced siblings left by deploykit processes that no longer run.

    Only folders named exactly as :func:`atomic_folder` names them, for this target, whose writer's pid
    is gone (SIGKILL, power loss): a live writer's folder is never touched. Returns what was removed.
    """
    target = Path(os.path.abspath(target))
    removed = []
    with contextlib.suppress(OSError):  # an unreadable parent: nothing to sweep, the write will say why
        for entry in target.parent.iterdir():
            m = _LEFTOVER.match(entry.name)
            if m and m["name"] == target.name and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _empty_folder(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publishable(folder: Path) -> None:
    """Give every file the mode a plain ``open`` would: some writers (safetensors) create files 0600."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            p = Path(root) / name
            os.chmod(p, (0o666 | (p.stat().st_mode & 0o111)) & ~mask)
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, *, overwrite: bool = False,
                  is_own: Callable[[Path], bool] | None = None, what: str = "folder") -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it becomes ``target`` by rename.

    On any exception (or KeyboardInterrupt) the temporary folder is removed and ``target`` is left
    exactly as it was: an interrupted write never leaves a half-written folder under the target name.
    The temporary folder lives in the same parent so the final rename is a same-filesystem rename.
    ``target`` is checked again at the rename: a folder that appeared meanwhile (a second command
    writing the same place) is never replaced without ``overwrite``, nor one ``is_own`` disowns.
    OSErrors, the block's included, become :class:`FilesystemError`.
    """
    target = Path(os.path.abspath(target))
    if target.exists() and not overwrite and not _empty_folder(target):
        raise TargetExistsError(f"{target} already exists", hint="pass --force (overwrite=True) or choose another path")
    sweep_leftovers(target)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{tag}"
    with os_errors(target.parent, f"create the {what} in"):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        with os_errors(target, f"write the {what}"):
            yield tmp
            _publishable(tmp)
            _publish(tmp, target, tag, overwrite=overwrite, is_own=is_own, what=what)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, target: Path, tag: str, *, overwrite: bool, is_own: Callable[[Path], bool] | None,
             what: str) -> None:
    """Rename ``tmp`` onto ``target``; an existing target is moved aside first and removed after."""
    if not target.exists() or _empty_folder(target):
        try:
            os.rename(tmp, target)  # replaces an empty folder; fails on a non-empty one created meanwhile
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
    if not overwrite:
        raise TargetExistsError(f"{target} appeared while the {what} was being written (another command?); "
                                "it was left as it is and nothing was written", hint="choose another path, or pass --force")
    if target.is_file() or (is_own is not None and next(target.iterdir(), None) is not None and not is_own(target)):
        raise TargetExistsError(f"{target} is not {_a(what)} deploykit wrote; it was left as it is and nothing was "
                                "written", hint="choose another path")
    # Two renames (old out, new in) keep the window without a complete folder as short as possible.
    old = target.parent / f".{target.name}.old-{tag}"
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_bytes(paths: Sequence[str | os.PathLike]) -> int:
    """Total bytes of the files at or under ``paths`` (missing ones count 0): a free-space estimate."""
    total = 0
    for p in map(Path, paths):
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total
