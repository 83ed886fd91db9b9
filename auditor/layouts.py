"""Group one recursive listing into checkpoints by what their writers leave behind.

A folder name such as `checkpoint-500` is a hint, not evidence: a folder is a checkpoint because of
the files in it (our manifest, a torch.distributed.checkpoint `.metadata`, a Trainer's
`trainer_state.json`, accelerate's `random_states_0.pkl`, DeepSpeed's `*_model_states.pt`, …). A
step-like name alone makes a folder a checkpoint only when nothing below it is one. Every file of the
listing ends up in exactly one checkpoint, among a run's own files (DeepSpeed's `latest` tag), or in
`Survey.uncovered`, so a scan can say what it did not check.
"""

from __future__ import annotations

import bisect
import posixpath
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from auditor.manifest import MANIFEST_NAME, SAVING_MARKER, SIDECAR_SUFFIX
from auditor.pickles import TORCH_SUFFIXES

SINGLE_FILE_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")
# Files the probe stores beside a single-file checkpoint: part of it, not checkpoints themselves.
PROBE_SUFFIXES = ("ckpt-probe-batch.safetensors", "ckpt-probe-reference.safetensors")
# Files a writer keeps in the run folder, naming its newest checkpoint.
RUN_TAG_FILES = ("latest", "latest_checkpointed_iteration.txt")

_HF = re.compile(r"^checkpoint-(\d+)$")
_MEGATRON = re.compile(r"^iter_(\d{7})$")
_STEP_NAME = re.compile(
    r"^(?:checkpoint|ckpt|step|global_step|iter|iteration|epoch)[=_-]?(\d+)$|^(\d+)$", re.IGNORECASE
)
_STEP_IN_NAME = re.compile(r"(?:step|iter|global_step|ckpt|checkpoint)[=_-]?(\d+)", re.IGNORECASE)
_ORBAX_MARKERS = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt", "_METADATA"})
_ACCELERATE = re.compile(r"^random_states_\d+\.pkl$")
_DEEPSPEED = re.compile(r"^(?:mp_rank_\d+_model_states\.pt|.*_optim_states\.pt)$")
_MEGATRON_RANK_DIR = re.compile(r"^mp_rank_\d+(?:_\d+)*$")
_WEIGHTS = re.compile(r"\.(?:safetensors|bin|pt|pth)$")
# A Hugging Face hub cache repo folder (huggingface_hub's repo_folder_name): models--ORG--NAME/.
_HUB_CACHE_REPO = re.compile(r"^(?:models|datasets|spaces)--.+")
# An OpenSSF model-signing signature's default file name (a signed base model; signing verifies it).
MODEL_SIG = "model.sig"
# A single-file checkpoint's signature (`auditor seal FILE --sign`) sits beside it as `<file>.sig`.
SIGNATURE_SUFFIX = ".sig"


@dataclass
class Checkpoint:
    """One checkpoint found under a prefix: a folder or a single file."""

    url: str  # as the user would spell it: prefix + relative path
    path: str  # protocol-less path on the filesystem
    run: str  # folder relative to the prefix that holds this checkpoint ("." at the top)
    layout: str  # see LAYOUTS
    kind: str  # "dir" or "file"
    step: int | None = None
    manifest_path: str | None = None
    # No manifest yet where one is coming: a save in progress, or newer than every sealed sibling.
    expect_manifest: bool = False
    # relative path -> fsspec info dict, from the listing (sizes, versions, server checksums)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Files the writer provably writes that this checkpoint lacks, relative path -> the evidence.
    expected_absent: dict[str, str] = field(default_factory=dict)

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


# What each layout name means: the writer whose files were found.
LAYOUTS = {
    "manifest": "a folder sealed by ckpt-auditor whose writer is not otherwise recognised",
    "hf-trainer": "Hugging Face Trainer checkpoint (trainer_state.json)",
    "accelerate": "accelerate save_state folder (random_states_<rank>.pkl)",
    "deepspeed": "DeepSpeed global_step folder (*_model_states.pt, *_optim_states.pt)",
    "megatron": "Megatron-LM iteration folder (mp_rank_XX/model_optim_rng.pt or metadata.json + .distcp)",
    "dcp": "torch.distributed.checkpoint folder (.metadata)",
    "orbax": "Orbax step folder",
    "hf-model": "save_pretrained folder (config.json and weights, or a shard index)",
    "folder": "a step-named folder of files with no writer-specific marker",
    "hf-cache": "Hugging Face hub cache repo folder (models--ORG--NAME/: blobs/, snapshots/<rev>/ links)",
    "signed": "a folder signed with OpenSSF model-signing (model.sig) whose writer is not otherwise recognised",
    "single-file": "one checkpoint file, its manifest the sidecar <file>.manifest.json",
    "unknown": "a folder named explicitly whose files match no known writer",
}


@dataclass
class Survey:
    """What one listing holds: checkpoints, run-level files, and files that belong to neither."""

    checkpoints: list[Checkpoint] = field(default_factory=list)
    # relative path (to the surveyed root) -> info
    run_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    uncovered: dict[str, dict[str, Any]] = field(default_factory=dict)


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


def _step_named(name: str) -> bool:
    return bool(_STEP_NAME.match(name) or _MEGATRON.match(name))


class _Tree:
    """The listing as folders and files, with parents inferred where an object store lists none."""

    def __init__(self, listing: dict[str, dict[str, Any]], root: str) -> None:
        self.root = root
        self.info: dict[str, dict[str, Any]] = {}
        self.dirs: set[str] = {root}
        self.kids: dict[str, set[str]] = {}
        for raw, info in listing.items():
            path = raw.rstrip("/")
            if path == root or not path.startswith(root + "/"):
                continue
            if info.get("type") == "directory":
                self.dirs.add(path)
            else:
                self.info[path] = info
            parent, name = posixpath.split(path)
            self.kids.setdefault(parent, set()).add(name)
            while parent != root and parent not in self.dirs:
                self.dirs.add(parent)
                grand, pname = posixpath.split(parent)
                self.kids.setdefault(grand, set()).add(pname)
                parent = grand
        self.keys = sorted(self.info)

    def subdirs(self, folder: str) -> list[str]:
        return sorted(f"{folder}/{n}" for n in self.kids.get(folder, ()) if f"{folder}/{n}" in self.dirs)

    def files(self, folder: str) -> list[str]:
        return sorted(n for n in self.kids.get(folder, ()) if f"{folder}/{n}" in self.info)

    def subtree(self, folder: str) -> list[str]:
        """Sorted file paths under `folder/`: one bisect, not a scan of the whole listing."""
        # "0" is the character after "/": [folder + "/", folder + "0") is exactly the subtree.
        return self.keys[bisect.bisect_left(self.keys, folder + "/") : bisect.bisect_left(self.keys, folder + "0")]


def evidence(tree: _Tree, folder: str) -> str | None:
    """Name the writer whose marker files sit directly in `folder`, or None."""
    names = set(tree.files(folder))
    subdirs = {posixpath.basename(d) for d in tree.subdirs(folder)}
    # The whole repo folder is one checkpoint: its snapshot files link to its blobs (named by digest).
    if _HUB_CACHE_REPO.match(posixpath.basename(folder)) and "snapshots" in subdirs:
        return "hf-cache"
    if "trainer_state.json" in names:
        return "hf-trainer"
    if any(_ACCELERATE.match(n) for n in names):
        return "accelerate"
    if any(_DEEPSPEED.match(n) for n in names):
        return "deepspeed"
    if any(_MEGATRON_RANK_DIR.match(d) and f"{folder}/{d}/model_optim_rng.pt" in tree.info for d in subdirs) or (
        "metadata.json" in names and "common.pt" in names
    ):
        return "megatron"
    if ".metadata" in names:
        return "dcp"
    if names & _ORBAX_MARKERS:
        return "orbax"
    if "model.safetensors.index.json" in names or "pytorch_model.bin.index.json" in names or (
        "config.json" in names and any(_WEIGHTS.search(n) and "probe" not in n for n in names)
    ):
        return "hf-model"
    if MANIFEST_NAME in names or SAVING_MARKER in names:
        return "manifest"
    if MODEL_SIG in names:
        return "signed"
    return None


def survey(listing: dict[str, dict[str, Any]], root: str, prefix_url: str, *, whole: bool = False) -> Survey:
    """Group a recursive listing of `root` (`fs.find(root, withdirs=True, detail=True)`).

    With `whole`, `root` itself is taken as one checkpoint whatever it holds (`verify URL`).
    """
    root = root.rstrip("/")
    tree = _Tree(listing, root)
    out = Survey()
    # Bottom-up: which folders are checkpoints by evidence, and which hold one below them.
    marked = {d: evidence(tree, d) for d in tree.dirs}
    below: dict[str, bool] = {}
    for d in sorted(tree.dirs, key=lambda p: -p.count("/")):
        # Only a step-named folder below makes this one a run rather than a checkpoint: a marked
        # folder without a step in its name is a part (FSDP's pytorch_model_fsdp_0/ DCP folder).
        below[d] = any(below[s] or _step_named(posixpath.basename(s)) for s in tree.subdirs(d))

    def layout_of(folder: str) -> str | None:
        if marked[folder]:
            return marked[folder]
        named = _step_named(posixpath.basename(folder)) and not below[folder]
        return "folder" if named else None

    def nested(folder: str, parent: str) -> bool:
        # A marked folder inside a checkpoint is one of its parts (FSDP's pytorch_model_fsdp_0/ DCP
        # folder inside checkpoint-N/) unless its own name says it is a checkpoint of its own.
        return _step_named(posixpath.basename(folder)) and layout_of(folder) is not None and folder != parent

    def take(folder: str, layout: str, run: str) -> None:
        own: dict[str, dict[str, Any]] = {}
        stack = [folder]
        while stack:
            d = stack.pop()
            for name in tree.files(d):
                own[f"{d}/{name}"[len(folder) + 1 :]] = tree.info[f"{d}/{name}"]
            for sub in tree.subdirs(d):
                if nested(sub, folder):
                    walk(sub, _rel(root, d))
                else:
                    stack.append(sub)
        out.checkpoints.append(_dir_checkpoint(folder, layout, run, own, root, prefix_url))

    def walk(folder: str, run: str) -> None:
        layout = layout_of(folder)
        if layout:
            take(folder, layout, run)
            return
        for sub in tree.subdirs(folder):
            walk(sub, _rel(root, folder))
        _loose_files(tree, folder, root, prefix_url, out)

    if whole:
        take(root, layout_of(root) or "unknown", ".")
    else:
        walk(root, ".")
    _expect_from_siblings(out.checkpoints)
    return out


def _expect_from_siblings(checkpoints: list[Checkpoint]) -> None:
    """Expect of an unsealed folder checkpoint every file that all its siblings of the same writer hold.

    Without a manifest, what a writer writes is seen in the other checkpoints it wrote in the same
    run: a file present in every one of them but absent here was lost (a partial copy, a deletion).
    """
    groups: dict[tuple[str, str], list[Checkpoint]] = {}
    for ck in checkpoints:
        # Hub cache repos are different models, not a series of one writer's saves.
        if ck.kind != "dir" or ck.layout in ("unknown", "hf-cache"):
            continue
        # Siblings of one series share their name but for the step (checkpoint-2, checkpoint-4),
        # so losing the very file that named the writer (trainer_state.json) still shows.
        family = re.sub(r"\d+", "#", ck.name)
        groups.setdefault((ck.run, family if "#" in family else f"layout:{ck.layout}"), []).append(ck)
    for group in groups.values():
        if len(group) < 2:
            continue
        for ck in group:
            if ck.manifest_path or ck.expect_manifest:
                continue  # a manifest says what it holds; a save in progress holds what it has so far
            others = [o for o in group if o is not ck]
            common = set.intersection(*(set(o.files) for o in others))
            # The auditor's own probe files come with sealing, not with the writer.
            for rel in sorted(r for r in common - set(ck.files) if not r.endswith(PROBE_SUFFIXES)):
                ck.expected_absent[rel] = f"absent, but present in the {len(others)} other checkpoint(s) of the run"


def _rel(root: str, path: str) -> str:
    return path[len(root) + 1 :] if path.startswith(root + "/") else "."


def _loose_files(tree: _Tree, folder: str, root: str, prefix_url: str, out: Survey) -> None:
    """Files of a folder that is no checkpoint: single-file checkpoints, run tags, or uncovered."""
    names = tree.files(folder)
    companions: set[str] = set()
    for name in names:
        if not name.endswith(SINGLE_FILE_SUFFIXES) or name.endswith(PROBE_SUFFIXES):
            continue
        path = f"{folder}/{name}"
        files = _single_files(tree.info, path)
        companions.update(files)
        sidecar = path + SIDECAR_SUFFIX
        if sidecar in tree.info:
            companions.add(posixpath.basename(sidecar))
        out.checkpoints.append(Checkpoint(
            url=_url(prefix_url, _rel(root, path)), path=path, run=_rel(root, folder), layout="single-file",
            kind="file", step=step_from_name(posixpath.splitext(name)[0]),
            manifest_path=sidecar if sidecar in tree.info else None, files=files,
        ))  # fmt: skip
    for name in names:
        # A sidecar whose file is gone: the checkpoint it sealed is missing, not an unclaimed file.
        if name.endswith(SIDECAR_SUFFIX) and name not in companions:
            file = name[: -len(SIDECAR_SUFFIX)]
            if file and file not in names:
                path = f"{folder}/{file}"
                companions.add(name)
                out.checkpoints.append(Checkpoint(
                    url=_url(prefix_url, _rel(root, path)), path=path, run=_rel(root, folder), layout="single-file",
                    kind="file", step=step_from_name(posixpath.splitext(file)[0]),
                    manifest_path=f"{folder}/{name}", files={},
                ))  # fmt: skip
    for name in names:
        if name in companions:
            continue
        rel = _rel(root, f"{folder}/{name}")
        (out.run_files if name in RUN_TAG_FILES else out.uncovered)[rel] = tree.info[f"{folder}/{name}"]


def adopt(found: Survey, rels: list[str], root: str, prefix_url: str) -> None:
    """Make single-file checkpoints of uncovered files whose contents proved them torch files."""
    root = root.rstrip("/")
    for rel in rels:
        info = found.uncovered.pop(rel)
        path = f"{root}/{rel}"
        folder = posixpath.dirname(rel) or "."
        name = posixpath.basename(rel)
        files = {name: info}
        for suffix in PROBE_SUFFIXES:
            if f"{rel}.{suffix}" in found.uncovered:
                files[f"{name}.{suffix}"] = found.uncovered.pop(f"{rel}.{suffix}")
        if rel + SIGNATURE_SUFFIX in found.uncovered:
            files[name + SIGNATURE_SUFFIX] = found.uncovered.pop(rel + SIGNATURE_SUFFIX)
        sidecar = found.uncovered.pop(rel + SIDECAR_SUFFIX, None)
        found.checkpoints.append(Checkpoint(
            url=_url(prefix_url, rel), path=path, run=folder, layout="single-file", kind="file",
            step=step_from_name(name), files=files,
            manifest_path=path + SIDECAR_SUFFIX if sidecar is not None else None,
        ))  # fmt: skip


def _dir_checkpoint(path: str, layout: str, run: str, files: dict[str, dict[str, Any]], root: str,
                    prefix_url: str) -> Checkpoint:
    manifest = files.pop(MANIFEST_NAME, None)
    saving = files.pop(SAVING_MARKER, None)  # never part of the checkpoint, even when left behind
    return Checkpoint(
        url=_url(prefix_url, _rel(root, path)),
        path=path,
        run=run,
        layout=layout,
        kind="dir",
        step=step_from_name(posixpath.basename(path)),
        manifest_path=f"{path}/{MANIFEST_NAME}" if manifest is not None else None,
        expect_manifest=manifest is None and saving is not None,
        files=files,
    )


def discover(listing: dict[str, dict[str, Any]], root: str, prefix_url: str) -> list[Checkpoint]:
    """Return only the checkpoints of `survey`."""
    return survey(listing, root, prefix_url).checkpoints


def _url(prefix_url: str, rel: str) -> str:
    if rel in ("", "."):
        return prefix_url.rstrip("/") or prefix_url
    return prefix_url.rstrip("/") + "/" + rel


def single(listing: dict[str, dict[str, Any]], path: str, url: str) -> Checkpoint | None:
    """Describe the checkpoint at exactly `path` (a folder or a file), whatever its layout."""
    path = path.rstrip("/")
    info = listing.get(path)
    if info is not None and info.get("type") != "directory":
        sidecar = path + SIDECAR_SUFFIX
        return Checkpoint(
            url=url, path=path, run=".", layout="single-file", kind="file",
            step=step_from_name(posixpath.splitext(posixpath.basename(path))[0]),
            manifest_path=sidecar if sidecar in listing else None, files=_single_files(listing, path),
        )  # fmt: skip
    found = survey(listing, path, url, whole=True).checkpoints
    ck = next(c for c in found if c.path == path)
    ck.url = url
    return ck


def _single_files(listing: dict[str, dict[str, Any]], path: str) -> dict[str, dict[str, Any]]:
    """Return a single-file checkpoint's files: the file and its probe companions, by name."""
    name = posixpath.basename(path)
    files = {name: listing[path]}
    for suffix in PROBE_SUFFIXES:
        companion = f"{path}.{suffix}"
        if companion in listing:
            files[f"{name}.{suffix}"] = listing[companion]
    if path + SIGNATURE_SUFFIX in listing:
        files[name + SIGNATURE_SUFFIX] = listing[path + SIGNATURE_SUFFIX]
    return files
