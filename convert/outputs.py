"""The outputs of a run: every problem with them found at once before any work, a lock per output (and per
checkpoint folder) held for the whole run, so that two runs never write the same file, and a full disk while writing
them named in one line."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import tempfile
from pathlib import Path

from sepconv.convert.errors import DiskFullError, OutputBusyError, OutputPathError, SepconvError
from sepconv.convert.export.manifest import manifest_path
from sepconv.convert.export.targets import extensions_text, registered_targets, target_for
from sepconv.convert.files import disk_full


@contextlib.contextmanager
def locked(paths: list[Path]):
    """An exclusive lock per output and per checkpoint folder for the whole run: a second run writing any of them
    fails at once instead of overwriting the first one's files. Each lock is a `.NAME.lock` file beside the path,
    held with flock and removed at the end (a killed run leaves it, unlocked: the next run takes it over, and removes
    the partial files the killed run left beside the output)."""
    held = []
    try:
        for path in sorted({p.absolute() for p in paths}):
            if path.parent.is_dir():  # a checkpoint folder under a folder not made yet: nobody can be writing it
                held.append(_lock(path))
                _remove_partials(path)
        yield
    finally:
        for lock, fd in reversed(held):
            lock.unlink(missing_ok=True)  # while still holding it, so that nobody takes a lock on a removed file
            os.close(fd)


def _remove_partials(path: Path) -> None:
    """The temporary files a killed run left beside `path` (staging's .NAME.*.partial*, its manifest's): ours to
    remove, since we hold the lock on `path`."""
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.partial*"):
        with contextlib.suppress(OSError):
            if leftover.is_file():
                leftover.unlink()


def _lock(path: Path) -> tuple[Path, int]:
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(f"another convert-model run is writing {path} (it holds {lock}): wait for it to "
                                  f"finish or choose another output") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return lock, fd
        os.close(fd)  # the run that held it removed it while we waited for it: lock the new one


def check_outputs(source: Path, outputs, options) -> list[Path]:
    """Every output problem at once, before any work: extension, duplicate, existing file, folder (`options`: a
    ConvertOptions; its `overwrite` decides about existing files)."""
    if isinstance(outputs, (str, os.PathLike)):
        outputs = [outputs]
    targets = [Path(o) for o in outputs]
    if not targets:
        raise OutputPathError(f"No output given; name at least one {extensions_text()} file")
    problems = []
    seen = set()
    for target in targets:
        if target_for(target) is None:
            problems.append(f"{target}: unknown extension {target.suffix!r}, use one of "
                            f"{sorted(registered_targets())}")
        elif target.resolve() in seen:
            problems.append(f"{target}: named twice")
        elif source.exists() and target.exists() and target.resolve() == source.resolve():
            problems.append(f"{target}: is the input model; choose another output name")
        elif target.is_dir():
            problems.append(f"{target}: is a directory")
        elif target.exists() and not options.overwrite:
            problems.append(f"{target}: exists; pass --overwrite (overwrite=True) to replace it")
        elif manifest_path(target).is_dir():
            problems.append(f"{manifest_path(target)}: is a directory, where {target.name}'s manifest goes")
        elif manifest_path(target).exists() and not options.overwrite:
            problems.append(f"{manifest_path(target)}: exists (where {target.name}'s manifest goes); pass "
                            f"--overwrite (overwrite=True) to replace it")
        elif not target.parent.resolve().is_dir():
            problems.append(f"{target}: folder {target.parent} does not exist; create it first")
        elif not _writable(target.parent):
            problems.append(f"{target}: folder {target.parent} is not writable")
        seen.add(target.resolve())
    if problems:
        raise OutputPathError("; ".join(problems))
    return targets


def _writable(folder: Path) -> bool:
    """Try it: os.access says yes to root even on a read-only file system."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_as(doing: str, where):
    """An OSError (or a converter's wrapping of one) saying the device is full becomes one DiskFullError line."""
    try:
        yield
    except Exception as error:
        if isinstance(error, SepconvError) or not disk_full(error):
            raise
        raise DiskFullError(f"No space left on device while {doing} {where}: free space or choose another "
                            f"folder") from None
