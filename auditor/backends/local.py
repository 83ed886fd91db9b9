"""Local disk: listing from lstat alone (special files and links are hazards, never opened), guarded opens,
atomic renames."""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from auditor.backends.base import UNRESOLVABLE_ERRNOS, Backend, PathHazard

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _stat_info(path: str, st: os.stat_result, kind: str, **extra: Any) -> dict[str, Any]:
    """An info dict shaped like fsspec's LocalFileSystem.info, from a stat we already have."""
    out: dict[str, Any] = {"name": path, "size": st.st_size, "type": kind, "created": st.st_ctime,
                           "islink": False, "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid,
                           "mtime": st.st_mtime, "ino": st.st_ino, "nlink": st.st_nlink}
    out.update(extra)
    return out


def _hazard(path: str, st: os.stat_result, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    # Listed as "other" with size 0: nothing downstream may take it for a file to read.
    return {**_stat_info(path, st, "other", **extra), "size": 0, "hazard": code, "hazard_detail": detail}


def local_entry(path: str, lst: os.stat_result | None = None) -> dict[str, Any]:
    """Describe one local path from lstat, never opening it; a symlink is resolved but not followed further.

    Regular files and folders get fsspec-shaped info; a symlink to a regular file gets its target's
    size and `target` (the resolved path, to be checked against the checkpoint); anything else is
    listed with a `hazard` code: `special_file` (FIFO, socket, device, link to a folder) or
    `path_unresolvable` (a link loop, a dangling link, a name too long).
    """
    lst = lst if lst is not None else os.lstat(path)
    if stat.S_ISREG(lst.st_mode):
        return _stat_info(path, lst, "file")
    if stat.S_ISDIR(lst.st_mode):
        return _stat_info(path, lst, "directory")
    if not stat.S_ISLNK(lst.st_mode):
        return _hazard(path, lst, "special_file", f"{_kind(lst.st_mode)}; never opened")
    link = {"islink": True, "destination": _readlink(path)}
    try:
        st = os.stat(path)
    except OSError as e:
        why = "a symbolic link loop" if e.errno == errno.ELOOP else \
            "a dangling symbolic link" if e.errno == errno.ENOENT else f"an unresolvable symbolic link ({e.strerror})"
        return _hazard(path, lst, "path_unresolvable", f"{why} to {link['destination']!r}; not followed", **link)
    target = os.path.realpath(path)
    if not stat.S_ISREG(st.st_mode):
        return _hazard(path, lst, "special_file",
                       f"a symbolic link to {target!r}, {_kind(st.st_mode)}; not followed", **link, target=target)
    return {**_stat_info(path, st, "file"), **link, "target": target}


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def local_info(path: str) -> dict[str, Any]:
    """Stat one local path without following anything odd; PathHazard for a path that cannot resolve."""
    try:
        return local_entry(path)
    except OSError as e:
        if e.errno in UNRESOLVABLE_ERRNOS:
            raise PathHazard("path_unresolvable", path, f"cannot be resolved: {e.strerror}") from e
        raise


def local_find(root: str) -> dict[str, dict[str, Any]]:
    """List a local tree as fsspec's find(withdirs=True, detail=True) would, from lstat alone.

    Symlinked folders are never entered, special files never opened; a subfolder that cannot be
    read is one hazard entry, not a failed listing: it is a finding on its checkpoint, not an outage.
    """
    top = local_info(root)
    out = {root: top}
    if top["type"] != "directory":
        return out
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            if folder == root:
                raise
            st = os.lstat(folder)
            out[folder] = _hazard(folder, st, "storage_error", f"folder cannot be listed: {e.strerror}")
            continue
        for entry in entries:
            path = posixpath.join(folder, entry.name)
            try:
                info = local_entry(path, entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue  # removed since the folder was read
            out[path] = info
            if info["type"] == "directory":
                stack.append(path)
    return out


def local_ls(folder: str) -> dict[str, dict[str, Any]]:
    """List one local folder from lstat alone, keyed by path."""
    out = {}
    for entry in os.scandir(folder):
        path = posixpath.join(folder, entry.name)
        try:
            out[path] = local_entry(path, entry.stat(follow_symlinks=False))
        except FileNotFoundError:
            continue
    return out


def open_local_regular(path: str) -> Any:
    """Open a local file for reading only if it is a regular file, without ever blocking on open.

    O_NONBLOCK makes opening a FIFO return at once (a plain open waits for a writer forever);
    fstat then refuses anything that is not a regular file before one byte is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno in UNRESOLVABLE_ERRNOS:
            raise PathHazard("path_unresolvable", path, f"cannot be resolved: {e.strerror}") from e
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise PathHazard("special_file", path, f"{_kind(mode)}; never read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class GuardedLocalFileSystem(LocalFileSystem):
    """LocalFileSystem whose reads open regular files only: never a FIFO, a socket or a device."""

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        if mode == "rb":
            return open_local_regular(self._strip_protocol(path))
        return super()._open(path, mode=mode, block_size=block_size, **kwargs)


def guarded_local(fs: AbstractFileSystem) -> AbstractFileSystem:
    """Return a local filesystem whose reads refuse special files (`fs` itself if it already does)."""
    if isinstance(fs, GuardedLocalFileSystem) or not isinstance(fs, LocalFileSystem):
        return fs
    return GuardedLocalFileSystem(auto_mkdir=getattr(fs, "auto_mkdir", False))


class LocalBackend(Backend):
    """Local disk: OS paths, os.replace renames, lstat listings that never follow or open anything odd."""

    protocols = ("file", "local")
    is_local = True
    renames_atomically = True

    def guarded(self) -> Backend:
        # Whatever opens files through the guarded fs (zip checks, the pickle scan) gets the same guard.
        fs = guarded_local(self.fs)
        return self if fs is self.fs else LocalBackend(fs)

    def local_path(self, path: str) -> str | None:
        return os.path.abspath(path)

    def info(self, path: str) -> dict[str, Any]:
        return local_info(path)

    def find(self, path: str) -> dict[str, dict[str, Any]]:
        # fsspec's local find follows symlinks and stats through them (and fails on a loop).
        return local_find(path)

    def ls(self, path: str) -> dict[str, dict[str, Any]]:
        return local_ls(path or ".")

    def open_read(self, path: str, block_size: int, **open_kw: Any) -> Any:
        return open_local_regular(path)

    def unresolvable(self, exc: BaseException, path: str) -> PathHazard | None:
        # On local disk a loop or a path through a file is the checkpoint's problem, not the disk's.
        if isinstance(exc, OSError) and exc.errno in UNRESOLVABLE_ERRNOS:
            return PathHazard("path_unresolvable", path, f"cannot be resolved: {exc.strerror}")
        return None
