"""What every command checks about where it writes, before it does any work.

The promises (tests/robustness checks each one):
- an output never overlaps an input: not the same path, not a folder that holds an input, not a file
  inside an input folder, compared by resolved path (symlinks followed), so `--overwrite` can only ever
  replace an earlier output;
- the place an output goes can be written (its parent is a folder, or can be made one, and is writable),
  checked before the model is loaded;
- one run at a time per output: a lock beside it, taken before the work folder is touched;
- files appear whole: written to a temporary sibling and renamed, with the permissions the umask gives.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from tlq.errors import TlqError

def resolved(path: str | os.PathLike[str]) -> Path:
    """The absolute path with every symlink followed (the target need not exist)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_disjoint(outputs: Mapping[str, str | os.PathLike[str] | None],
                   inputs: Mapping[str, str | os.PathLike[str] | None]) -> None:
    """Refuse when an output is an input, holds an input, or lies inside an input.

    `outputs` and `inputs` map an option name ('--out', '--images', 'the model folder') to a path or
    None. An output inside an input folder would add or replace files in the user's data; an input
    inside an output would be deleted by `--overwrite` or by the final rename.
    """
    resolved_inputs = {name: resolved(p) for name, p in inputs.items() if p is not None}
    for out_name, out in outputs.items():
        if out is None:
            continue
        target = resolved(out)
        for in_name, source in resolved_inputs.items():
            if _within(source, target) or _within(target, source):
                relation = ("is" if target == source else "holds" if _within(source, target) else "is inside")
                raise TlqError(f"{out_name} {out} {relation} {in_name} {source}: "
                               f"write the output somewhere that is not part of any input")


def _mode(directory: bool) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def follow_umask(path: Path) -> None:
    """mkdtemp and some writers (safetensors through a temporary file) create 0700/0600: give the
    finished output, and everything in it, the mode a plain mkdir/open would, so others can serve it."""
    os.chmod(path, _mode(path.is_dir()))
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), _mode(True))
            for name in files:
                os.chmod(os.path.join(root, name), _mode(False))


def check_output_location(out: str | os.PathLike[str], what: str = "--out") -> Path:
    """The output's parent must be a writable folder (or creatable): say so now, not after calibrating."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    existing = parent
    while not existing.exists():
        if existing.is_symlink():
            raise TlqError(f"{what} {out}: {existing} is a broken symlink: point {what} at a real folder")
        existing = existing.parent
    if not existing.is_dir():
        raise TlqError(f"{what} {out}: {existing} is a file, not a folder: choose another {what}")
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise TlqError(f"{what} {out}: {existing} is on a read-only filesystem: choose a writable location")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TlqError(f"{what} {out}: cannot write in {existing} (permission denied): choose a writable location")
    return out


def check_file_output(out: str | os.PathLike[str], option: str) -> Path:
    """A single-file output (`eval --out`, `importance --out`): its folder must be writable, and it
    must not be a folder."""
    out = Path(out)
    check_output_location(out, option)
    if out.is_dir():
        raise TlqError(f"{option} {out} is a folder: name a file, e.g. {out / 'report.json'}")
    return out


@contextmanager
def atomic_file(path: str | os.PathLike[str], what: str = "") -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; on success it is renamed to `path`, so the file is
    whole or absent. A failed write (disk full, read-only) is one line naming `path`; the temporary
    file goes away."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 - OSError, or safetensors' own I/O error
        tmp.unlink(missing_ok=True)
        reason = write_error(exc)
        if reason is None:
            raise
        raise TlqError(f"cannot write {what}{path}: {reason}") from None


def write_file_atomic(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write `data` to `path` whole or not at all (atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def describe_os_error(exc: OSError) -> str:
    """One line for a failed write, with the fix for the causes a user can act on."""
    if exc.errno == errno.ENOSPC:
        return "no space left on the device: free some space or write elsewhere"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror}: choose a writable location"
    return exc.strerror or str(exc)


def write_error(exc: BaseException) -> str | None:
    """One line for an exception that means a write failed (OSError, or safetensors' own I/O error), else None."""
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and ("I/O error" in text or "os error" in text):
        if "No space left" in text or "os error 28" in text:
            return "no space left on the device: free some space or write elsewhere"
        return text.splitlines()[0]
    return None


# -- one run per output ------------------------------------------------------------------------------

def lock_path_for(out: Path) -> Path:
    return out.parent / f".{out.name}.tlq-lock"


@contextmanager
def output_lock(out: str | os.PathLike[str], enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `out` for the whole run; a second run on the same output is refused.

    flock is released by the kernel when the process dies, so a killed run never blocks the next one.
    After taking the lock the file on disk must still be the one locked (a finishing run unlinks it),
    otherwise take it again.
    """
    if not enabled:
        yield
        return
    out = Path(out)
    path = lock_path_for(out)
    created = _first_missing(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TlqError(f"another tlq run is writing {out} (lock {path}): wait for it to finish, "
                           f"or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        _remove_empty(path.parent, created)


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder on the way to `folder` that does not exist yet (None if it exists)."""
    missing = None
    while not folder.exists():
        missing, folder = folder, folder.parent
    return missing


def _remove_empty(folder: Path, up_to: Path | None) -> None:
    """Remove the folders this run created on the way to its output, if a refusal left them empty."""
    if up_to is None:
        return
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == up_to:
            return
        folder = folder.parent


def remove_stale_siblings(out: Path) -> None:
    """Staging and trash folders a killed export left beside `out` (call with the output lock held)."""
    if not out.parent.is_dir():
        return
    for prefix in (f".{out.name}.tmp-", f".{out.name}.old-"):
        for path in out.parent.glob(prefix + "*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
