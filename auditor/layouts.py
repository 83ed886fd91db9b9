"""Find checkpoints under a prefix from one recursive listing, and name their layout, run and step."""

from __future__ import annotations

import bisect
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from auditor.manifest import MANIFEST_NAME, SAVING_MARKER, SIDECAR_SUFFIX

SINGLE_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".safetensors")
# Files the probe stores beside a single-file checkpoint: part of it, not checkpoints themselves.
PROBE_SUFFIXES = ("ckpt-probe-batch.safetensors", "ckpt-probe-reference.safetensors")
_HF = re.compile(r"^checkpoint-(\d+)$")
_MEGATRON = re.compile(r"^iter_(\d{7})$")
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt", "_METADATA")
_STEP_IN_NAME = re.compile(r"(?:step|iter|global_step|ckpt|checkpoint)[=_-]?(\d+)", re.IGNORECASE)


@dataclass
class Checkpoint:
    """One checkpoint found under a prefix: a folder or a single file."""

    url: str  # as the user would spell it: prefix + relative path
    path: str  # protocol-less path on the filesystem
    run: str  # folder relative to the prefix that holds this checkpoint ("." at the top)
    layout: str  # manifest | hf-trainer | hf-model | dcp | megatron | orbax | single-file
    kind: str  # "dir" or "file"
    step: int | None = None
    manifest_path: str | None = None
    # No manifest yet where one is coming: a save in progress, or newer than every sealed sibling.
    expect_manifest: bool = False
    # relative path -> fsspec info dict, from the listing (sizes, versions, server checksums)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def root(self) -> str:
        """The folder that the checkpoint's relative file paths start from."""
        return posixpath.dirname(self.path) if self.kind == "file" else self.path

    def newest_mtime(self) -> float | None:
        """Return the newest modification time among the listed files, as epoch seconds."""
        times = [t for t in (_mtime(i) for i in self.files.values()) if t is not None]
        return max(times) if times else None


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "modificationTime", "last_modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, (int, float)):
            # WebHDFS reports milliseconds.
            return float(value) / 1000.0 if key == "modificationTime" else float(value)
        if isinstance(value, str):
            from datetime import datetime

            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def step_from_name(name: str) -> int | None:
    """Guess the training step from a folder or file name (`checkpoint-500`, `step=500.ckpt`)."""
    for pattern in (_HF, _MEGATRON):
        m = pattern.match(name)
        if m:
            return int(m.group(1))
    if name.isdigit():
        return int(name)
    m = _STEP_IN_NAME.search(name)
    return int(m.group(1)) if m else None


def dir_layout(name: str, children: set[str]) -> str | None:
    """Name the layout of a folder from its name and direct children, or None if not a checkpoint."""
    if _HF.match(name):
        return "hf-trainer"
    if ".metadata" in children:
        return "dcp"
    if _MEGATRON.match(name):
        return "megatron"
    if name.isdigit() and any(m in children for m in _ORBAX_MARKERS):
        return "orbax"
    if _hf_model(children):
        return "hf-model"
    return "manifest" if MANIFEST_NAME in children or SAVING_MARKER in children else None


def _hf_model(children: set[str]) -> bool:
    """Tell whether a folder looks like `save_pretrained` output: weights and a config, no trainer state."""
    return "model.safetensors.index.json" in children or (
        "config.json" in children and any(c.endswith(".safetensors") and "probe" not in c for c in children)
    )


def discover(listing: dict[str, dict[str, Any]], root: str, prefix_url: str) -> list[Checkpoint]:
    """Group a recursive listing of `root` into checkpoints; nested runs are found at any depth.

    `listing` is `fs.find(root, withdirs=True, detail=True)`; paths are protocol-less.
    """
    root = root.rstrip("/")
    children: dict[str, set[str]] = {}
    is_dir: dict[str, bool] = {}
    for path, info in listing.items():
        path = path.rstrip("/")
        if path == root:
            continue
        is_dir[path] = info.get("type") == "directory"
        parent, name = posixpath.split(path)
        children.setdefault(parent, set()).add(name)
        # Object stores may list a file without listing its folder; infer the folders.
        while parent != root and parent.startswith(root + "/") and parent not in is_dir:
            is_dir[parent] = True
            grand, pname = posixpath.split(parent)
            children.setdefault(grand, set()).add(pname)
            parent = grand

    found: list[Checkpoint] = []
    keys = sorted(p.rstrip("/") for p in listing)
    listing = {p.rstrip("/"): info for p, info in listing.items()}

    def rel(p: str) -> str:
        return p[len(root) + 1 :] if p.startswith(root + "/") else "."

    def walk(folder: str) -> None:
        for name in sorted(children.get(folder, ())):
            path = f"{folder}/{name}" if folder else name
            if not is_dir.get(path):
                continue
            layout = dir_layout(name, children.get(path, set()))
            if layout:
                found.append(_dir_checkpoint(path, layout, listing, root, prefix_url, keys))
            else:
                walk(path)
        for name in sorted(children.get(folder, ())):
            path = f"{folder}/{name}" if folder else name
            if is_dir.get(path) or not name.endswith(SINGLE_FILE_SUFFIXES) or name.endswith(PROBE_SUFFIXES):
                continue
            sidecar = path + SIDECAR_SUFFIX
            ck = Checkpoint(
                url=_url(prefix_url, rel(path)),
                path=path,
                run=rel(folder),
                layout="single-file",
                kind="file",
                step=step_from_name(posixpath.splitext(name)[0]),
                manifest_path=sidecar if sidecar in listing else None,
                files=_single_files(listing, path),
            )
            found.append(ck)

    if root in listing and listing[root].get("type") != "directory":
        return []
    walk(root)
    return found


def _subtree(keys: list[str], path: str) -> list[str]:
    """Return the sorted keys under `path/`: one bisect, not a scan of the whole listing."""
    # "0" is the character after "/": [path + "/", path + "0") is exactly the subtree.
    return keys[bisect.bisect_left(keys, path + "/") : bisect.bisect_left(keys, path + "0")]


def _dir_checkpoint(
    path: str, layout: str, listing: dict[str, dict[str, Any]], root: str, prefix_url: str,
    keys: list[str] | None = None,
) -> Checkpoint:
    keys = sorted(listing) if keys is None else keys
    files = {p[len(path) + 1 :]: listing[p] for p in _subtree(keys, path) if listing[p].get("type") != "directory"}
    manifest = files.pop(MANIFEST_NAME, None)
    saving = files.pop(SAVING_MARKER, None)  # never part of the checkpoint, even when left behind
    parent = posixpath.dirname(path)
    rel_path = path[len(root) + 1 :] if path.startswith(root + "/") else "."
    rel_run = parent[len(root) + 1 :] if parent.startswith(root + "/") else "."
    return Checkpoint(
        url=_url(prefix_url, rel_path),
        path=path,
        run=rel_run,
        layout=layout,
        kind="dir",
        step=step_from_name(posixpath.basename(path)),
        manifest_path=f"{path}/{MANIFEST_NAME}" if manifest is not None else None,
        expect_manifest=manifest is None and saving is not None,
        files=files,
    )


def _url(prefix_url: str, rel: str) -> str:
    if rel in ("", "."):
        return prefix_url.rstrip("/") or prefix_url
    return prefix_url.rstrip("/") + "/" + rel


def single(listing: dict[str, dict[str, Any]], path: str, url: str) -> Checkpoint | None:
    """Describe the checkpoint at exactly `path` (a folder or a file), whatever its layout."""
    path = path.rstrip("/")
    info = listing.get(path)
    name = posixpath.basename(path)
    if info is not None and info.get("type") != "directory":
        sidecar = path + SIDECAR_SUFFIX
        return Checkpoint(
            url=url,
            path=path,
            run=".",
            layout="single-file",
            kind="file",
            step=step_from_name(posixpath.splitext(name)[0]),
            manifest_path=sidecar if sidecar in listing else None,
            files=_single_files(listing, path),
        )
    kids = {posixpath.basename(p.rstrip("/")) for p in listing if posixpath.dirname(p.rstrip("/")) == path}
    layout = dir_layout(name, kids) or "unknown"
    ck = _dir_checkpoint(path, layout, listing, posixpath.dirname(path), posixpath.dirname(url.rstrip("/")))
    ck.url = url
    ck.run = "."
    return ck


def _single_files(listing: dict[str, dict[str, Any]], path: str) -> dict[str, dict[str, Any]]:
    """Return a single-file checkpoint's files: the file and its probe companions, by name."""
    name = posixpath.basename(path)
    files = {name: listing[path]}
    for suffix in PROBE_SUFFIXES:
        companion = f"{path}.{suffix}"
        if companion in listing:
            files[f"{name}.{suffix}"] = listing[companion]
    return files
