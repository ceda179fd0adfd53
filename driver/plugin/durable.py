"""Files the plugin (root) writes: complete or not at all, never through a planted link.

* :func:`write_file` writes the new content to an exclusive temp file next to the target (``O_CREAT |
  O_EXCL | O_NOFOLLOW``, a random name, mode 0600 unless told), checks that every byte was written
  (short writes are continued, a write of 0 bytes or an ``ENOSPC`` is an error), fsyncs it, renames it
  over the target and fsyncs the directory. A rename replaces a symlink at the target instead of
  following it. On any error the temp file is removed and the old file stays as it was.
* :func:`private_dir` creates or checks a directory the plugin writes to at start: a real directory
  (not a symlink), owned by the plugin's user, and not writable by group or others (those bits are
  removed), so nobody else can plant files in it.
* :func:`read_file` reads a file without following a symlink at its path.

Errors are :class:`DurableError` (an ``OSError``) whose message names the file, the directory and the fix.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from pathlib import Path

from driver.errors import PartitaError

log = logging.getLogger(__name__)

_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class DurableError(PartitaError, OSError):
    """A file could not be written or read safely; the message names it, its directory and the fix."""


def _why(e: OSError) -> str:
    code = e.errno
    if code == errno.ENOSPC:
        return "no space left on the device"
    if code == errno.EDQUOT:
        return "the disk quota is exhausted"
    if code == errno.EROFS:
        return "the file system is read-only"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.ELOOP:
        return "a symlink is in the way"
    return e.strerror or str(e)


def _fix(e: OSError, directory: Path) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on the file system of {directory}; the plugin retries"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"make {directory} writable by the plugin (it runs as root; check the hostPath mount)"
    if e.errno == errno.ELOOP:
        return f"remove the symlink in {directory} (nothing there may be a link)"
    return f"check {directory}"


def write_error(what: str, path: Path, e: OSError) -> DurableError:
    return DurableError(e.errno or errno.EIO, f"cannot write {what} {path} in directory {path.parent}: {_why(e)}; "
                                              f"{_fix(e, path.parent)}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:     # a full device may answer 0 instead of ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def write_file(path: Path, data: bytes, *, what: str = "file", mode: int = 0o600, sync: bool = True) -> None:
    """Replace ``path`` with ``data``, completely or not at all (see the module doc). ``sync=False`` skips
    the two fsyncs: for files whose content is checked and rewritten anyway after a power loss."""
    try:
        dfd = os.open(path.parent, _OPEN_DIR)
    except OSError as e:
        raise write_error(what, path, e) from None
    tmp = f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        try:
            fd = os.open(tmp, _OPEN_NEW, mode, dir_fd=dfd)
        except OSError as e:
            raise write_error(what, path, e) from None
        try:
            try:
                _write_all(fd, data)
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as e:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise write_error(what, path, e) from None
        try:
            if sync:
                os.fsync(dfd)
        except OSError as e:   # the rename happened; only its durability is in doubt
            log.warning("fsync of directory %s after writing %s failed: %s", path.parent, path, e)
    finally:
        os.close(dfd)


def temp_name_of(path: Path) -> str:
    """The glob pattern of :func:`write_file`'s temp files for ``path``."""
    return f".{path.name}.*.tmp"


def remove_stale_temps(directory: Path, pattern: str = ".*.tmp") -> list[Path]:
    """Remove temp files a killed writer left in ``directory`` (the caller excludes concurrent writers).
    Returns those removed; errors are logged, never raised."""
    removed = []
    try:
        found = sorted(directory.glob(pattern))
    except OSError:
        return removed
    for p in found:
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove the stale temp file %s: %s", p, e.strerror)
    return removed


def remove_file(path: Path, *, what: str = "file") -> None:
    """Remove ``path`` (a symlink there is removed, never followed); missing is fine."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as e:
        raise DurableError(e.errno or errno.EIO, f"cannot remove {what} {path} in directory {path.parent}: "
                                                 f"{_why(e)}; {_fix(e, path.parent)}") from None


def read_file(path: Path, *, what: str = "file") -> bytes | None:
    """The content of ``path``; None when it does not exist. A symlink at ``path`` is an error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DurableError(e.errno, f"{what} {path} is a symlink; the plugin never follows links in its "
                                        f"directories — remove the link (and restore the file if you have it)") from None
        raise DurableError(e.errno or errno.EIO, f"cannot read {what} {path}: {_why(e)}") from None
    try:
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    except OSError as e:
        raise DurableError(e.errno or errno.EIO, f"cannot read {what} {path}: {_why(e)}") from None
    finally:
        os.close(fd)


def private_dir(path: Path, *, what: str = "directory", mode: int = 0o750) -> None:
    """Create ``path`` (mode ``mode``) or check it: a directory, not a symlink, owned by this process's user,
    with the group and other write bits removed."""
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError as e:
        raise DurableError(e.errno or errno.EIO, f"cannot create {what} {path}: {_why(e)}; "
                                                 f"{_fix(e, path.parent)}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise DurableError(errno.ENOTDIR, f"{what} {path} is not a directory but a "
                                          f"{'symlink' if stat.S_ISLNK(st.st_mode) else 'file'}; the plugin "
                                          f"writes only into a real directory — remove it and restart the plugin")
    if st.st_uid != os.geteuid():
        raise DurableError(errno.EPERM, f"{what} {path} is owned by uid {st.st_uid}, not by the plugin's uid "
                                        f"{os.geteuid()}; another user could plant files in it — "
                                        f"chown {os.geteuid()} {path} and restart the plugin")
    loose = stat.S_IMODE(st.st_mode) & (stat.S_IWGRP | stat.S_IWOTH)
    if loose:
        try:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~loose)
        except OSError as e:
            raise DurableError(e.errno or errno.EIO, f"{what} {path} is writable by group or others (mode "
                                                     f"{stat.S_IMODE(st.st_mode):o}) and cannot be tightened: "
                                                     f"{_why(e)}; chmod go-w {path}") from None
        log.warning("%s %s was writable by group or others (mode %o): removed those bits", what, path,
                    stat.S_IMODE(st.st_mode))
