"""Local disk: listing from lstat alone (special files and links are hazards, never opened), guarded opens,
atomic renames, and a filesystem object that reads without importing fsspec.

fsspec's import costs ~0.1 s (asyncio, importlib.metadata, ssl), more than a small local `verify`
spends on its work. `GuardedLocalFileSystem` answers what the read path asks of a local `fs`
(open for reading, info, ls, exists, cat_file, path normalisation) with fsspec's LocalFileSystem's
semantics, and hands everything else (writes, renames, removal, find, glob, ...) to a real fsspec
LocalFileSystem created on first use.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import stat
import sys
from typing import TYPE_CHECKING, Any

from auditor.backends.base import UNRESOLVABLE_ERRNOS, Backend, PathHazard

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

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


LOCAL_PROTOCOLS = ("file", "local")
# The prefixes fsspec's LocalFileSystem strips, in its order.
_PREFIXES = tuple(proto + sep for proto in LOCAL_PROTOCOLS for sep in ("://", ":"))


def strip_local_protocol(path: Any) -> str:
    """A local URL or path as fsspec's LocalFileSystem._strip_protocol gives it: absolute, posix, no trailing /.

    POSIX only (the auditor's local fast path); elsewhere fsspec's own is used.
    """
    path = os.fspath(path) if hasattr(path, "__fspath__") else path
    if not isinstance(path, str):
        raise TypeError(f"could not convert {path!r} to string")
    for prefix in _PREFIXES:
        if path.startswith(prefix):
            path = path.removeprefix(prefix)
            break
    if not path.startswith("/"):
        if path.startswith("~"):
            path = os.path.expanduser(path)
        else:
            path = path[2:] if path.startswith("./") else "" if path == "." else path
            path = f"{os.getcwd()}/{path}"
    return path.rstrip("/") or "/"


def _fsspec_info(path: str) -> dict[str, Any]:
    """fsspec LocalFileSystem.info of an already stripped path: follows one symlink, lists it as one."""
    out = os.stat(path, follow_symlinks=False)
    link = stat.S_ISLNK(out.st_mode)
    if link:
        out = os.stat(path, follow_symlinks=True)
    kind = "directory" if stat.S_ISDIR(out.st_mode) else "file" if stat.S_ISREG(out.st_mode) else "other"
    return _info_dict(path, out.st_size, kind, out, link)


def _info_dict(path: str, size: int, kind: str, out: os.stat_result, link: bool) -> dict[str, Any]:
    """The fields of fsspec's LocalFileSystem.info: `out` is the entry's own (lstat) result."""
    result: dict[str, Any] = {"name": path, "size": size, "type": kind,
                              "created": getattr(out, "st_birthtime", out.st_ctime), "islink": link}
    for name in ("mode", "uid", "gid", "mtime", "ino", "nlink"):
        result[name] = getattr(out, f"st_{name}")
    if link:
        result["destination"] = os.readlink(path)
    return result


def _fsspec_entry_info(entry: os.DirEntry[str]) -> dict[str, Any]:
    """fsspec LocalFileSystem.info of a scandir entry (what its ls(detail=True) lists)."""
    out = entry.stat(follow_symlinks=False)
    link = entry.is_symlink()
    kind = "directory" if entry.is_dir(follow_symlinks=False) else \
        "file" if entry.is_file(follow_symlinks=False) else "other"
    size = out.st_size
    if link:
        try:
            size = entry.stat(follow_symlinks=True).st_size
        except OSError:
            size = 0
    return _info_dict(strip_local_protocol(entry.path), size, kind, out, link)


@functools.cache
def _fsspec_guarded_class() -> type[AbstractFileSystem]:
    """fsspec's LocalFileSystem with the same read guard: the fallback for what the light class does not do."""
    # Imported here: fsspec is what the light class exists to avoid; only a write, a rename or
    # another operation it does not answer itself pays for it.
    from fsspec.implementations.local import LocalFileSystem

    class FsspecGuardedLocalFileSystem(LocalFileSystem):
        def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
            if mode == "rb":
                return open_local_regular(self._strip_protocol(path))
            return super()._open(path, mode=mode, block_size=block_size, **kwargs)

    return FsspecGuardedLocalFileSystem


class GuardedLocalFileSystem:
    """The local disk as an fsspec-shaped filesystem whose reads open regular files only (never a FIFO,
    a socket or a device), without importing fsspec for them.

    Reads, stats and listings behave as fsspec's LocalFileSystem does; any other attribute is the
    same operation on a guarded fsspec LocalFileSystem (same `auto_mkdir`), made on first use.
    """

    protocol: tuple[str, ...] = LOCAL_PROTOCOLS
    root_marker = "/"
    sep = "/"
    local_file = True
    fsid = "local"

    def __init__(self, auto_mkdir: bool = False, **storage_options: Any) -> None:
        self.auto_mkdir = auto_mkdir
        self.storage_options = storage_options
        self._fallback: AbstractFileSystem | None = None

    @property
    def dircache(self) -> dict[str, Any]:
        """Always empty: nothing is cached, a local listing is always today's (and no probe reaches fsspec)."""
        return {}

    def __repr__(self) -> str:
        return f"GuardedLocalFileSystem(auto_mkdir={self.auto_mkdir})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GuardedLocalFileSystem) and (other.auto_mkdir, other.storage_options) == \
            (self.auto_mkdir, self.storage_options)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.auto_mkdir))

    def __reduce__(self) -> tuple[Any, ...]:
        # The fallback (an fsspec instance) is rebuilt where it is needed, never shipped.
        return _rebuild, (self.auto_mkdir, self.storage_options)

    def fsspec(self) -> AbstractFileSystem:
        """The guarded fsspec LocalFileSystem that does what this class does not (imports fsspec)."""
        if self._fallback is None:
            self._fallback = _fsspec_guarded_class()(auto_mkdir=self.auto_mkdir, **self.storage_options)
        return self._fallback

    def __getattr__(self, name: str) -> Any:
        # Only reached for what the class does not define; dunders and our own slots are never delegated
        # (copy/pickle probe them before __init__ has run).
        if name.startswith("__") or name == "_fallback":
            raise AttributeError(name)
        return getattr(self.fsspec(), name)

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        return strip_local_protocol(path)

    @classmethod
    def _parent(cls, path: Any) -> str:
        return strip_local_protocol(path).rsplit("/", 1)[0] or "/"

    def unstrip_protocol(self, name: str) -> str:
        return f"file://{strip_local_protocol(name)}"

    def invalidate_cache(self, path: str | None = None) -> None:
        """Nothing is cached: every stat and listing asks the disk."""

    def open(self, path: Any, mode: str = "rb", block_size: Any = None, cache_options: Any = None,
             compression: Any = None, **kwargs: Any) -> Any:
        """Open for reading (a regular file only, never blocking); other modes go through fsspec."""
        if mode == "rb" and compression is None:
            return open_local_regular(strip_local_protocol(path))
        return self.fsspec().open(path, mode, block_size=block_size, cache_options=cache_options,
                                  compression=compression, **kwargs)

    def info(self, path: Any, **kwargs: Any) -> dict[str, Any]:
        if isinstance(path, os.DirEntry):
            return _fsspec_entry_info(path)
        return _fsspec_info(strip_local_protocol(path))

    def ls(self, path: Any, detail: bool = False, **kwargs: Any) -> list[Any]:
        path = strip_local_protocol(path)
        path_info = _fsspec_info(path)
        if path_info["type"] != "directory":
            return [path_info] if detail else [path_info["name"]]
        infos: list[Any] = []
        with os.scandir(path) as it:
            for entry in it:
                try:
                    infos.append(_fsspec_entry_info(entry) if detail else strip_local_protocol(entry.path))
                except FileNotFoundError:
                    pass
        return infos

    def exists(self, path: Any, **kwargs: Any) -> bool:
        try:
            self.info(path)
        except Exception:  # fsspec's exists: any failure to stat is "not there"
            return False
        return True

    def lexists(self, path: Any, **kwargs: Any) -> bool:
        return os.path.lexists(path)

    def isfile(self, path: Any) -> bool:
        return os.path.isfile(strip_local_protocol(path))

    def isdir(self, path: Any) -> bool:
        return os.path.isdir(strip_local_protocol(path))

    def size(self, path: Any) -> int | None:
        size: int | None = self.info(path).get("size")
        return size

    def cat_file(self, path: Any, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """The bytes of [start, end) (negative: from the end), read through the guarded open."""
        with self.open(path, "rb", **kwargs) as f:
            size = os.fstat(f.fileno()).st_size
            if start is not None:
                f.seek(start if start >= 0 else max(0, size + start))
            if end is None:
                data: bytes = f.read()
                return data
            end = end if end >= 0 else size + end
            data = f.read(end - f.tell())  # end before start: ValueError, as fsspec's
            return data


def _rebuild(auto_mkdir: bool, storage_options: dict[str, Any]) -> GuardedLocalFileSystem:
    return GuardedLocalFileSystem(auto_mkdir=auto_mkdir, **storage_options)


def is_fsspec_local(fs: Any) -> bool:
    """Whether `fs` is an fsspec LocalFileSystem, without importing fsspec (no fsspec loaded: it cannot be)."""
    module = sys.modules.get("fsspec.implementations.local")
    return module is not None and isinstance(fs, module.LocalFileSystem)


def is_local_fs(fs: Any) -> bool:
    """Whether `fs` reads the local disk directly: ours, or an fsspec LocalFileSystem."""
    return isinstance(fs, GuardedLocalFileSystem) or is_fsspec_local(fs)


def guarded_local(fs: AbstractFileSystem) -> AbstractFileSystem:
    """Return a local filesystem whose reads refuse special files (`fs` itself if it already does)."""
    if isinstance(fs, GuardedLocalFileSystem) or not is_fsspec_local(fs):
        return fs
    if isinstance(fs, _fsspec_guarded_class()):
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

    @classmethod
    def open_url(cls, url: str, options: dict[str, Any]) -> tuple[AbstractFileSystem, str]:
        """A plain path or file:// URL without options opens without fsspec; anything else through fsspec."""
        if options or "::" in url or os.sep != "/":
            return super().open_url(url, options)
        return GuardedLocalFileSystem(), strip_local_protocol(url)

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
