"""Training-state completeness: which components a checkpoint holds, recognised by structure.

A component is recognised by what a file holds, never by what it is called: an optimizer state is a
mapping with `state` and `param_groups` wherever it sits (DeepSpeed nests it, Lightning lists it,
Megatron keeps it beside the model), an RNG state is the shape `random.getstate()` or
`numpy.random.get_state()` returns, and so on. Every pickle is read as a skeleton
(`pickles.read_torch_skeleton`), never loaded. What a checkpoint must hold is what its writer always
writes (`ALWAYS_WRITES`), and for a sealed checkpoint also what the manifest declares.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from auditor import formats, pickles, safejson
from auditor.backends import open_parsed
from auditor.layouts import PROBE_SUFFIXES
from auditor.manifest import MANIFEST_NAME, SIDECAR_SUFFIX, TrainingState
from auditor.model import Finding, Severity

logger = logging.getLogger(__name__)

COMPONENTS = ("model", "optimizer", "scheduler", "rng", "scaler", "step")
_MISSING_CODE = {c: f"{c}_state_missing" for c in ("model", "optimizer", "scheduler", "rng", "scaler")} | {
    "step": "step_missing"
}

# What each writer writes into every checkpoint, whatever its options (the README's table). A
# component outside this is not required, unless a sealed manifest declares it or `scan.require`
# asks for it.
ALWAYS_WRITES: dict[str, tuple[str, ...]] = {
    "hf-trainer": ("model", "step"),  # + TOGETHER: save_only_model drops all three at once
    "accelerate": ("model", "rng"),  # save_state: the model(s) and random_states_<rank>.pkl
    "deepspeed": ("model", "step"),  # module + global_steps; optimizer state is optional, RNG never
    "megatron": ("model", "step", "optimizer", "rng"),  # unless args say --no-save-optim/--no-save-rng
    "dcp": ("model",),
    "orbax": (),  # tensorstore/OCDBT contents are not parsed: nothing can be recognised structurally
    "hf-model": ("model",),
    "folder": ("model",),
    "single-file": ("model",),
    "manifest": ("model",),
    "unknown": ("model",),
}
# Components a writer saves all together or not at all.
TOGETHER: dict[str, tuple[str, ...]] = {"hf-trainer": ("optimizer", "scheduler", "rng")}
# Where a writer puts a component, only to name the file in a finding (never to decide).
CONVENTIONAL_FILE: dict[tuple[str, str], str] = {
    ("hf-trainer", "model"): "model.safetensors",
    ("hf-trainer", "optimizer"): "optimizer.pt",
    ("hf-trainer", "scheduler"): "scheduler.pt",
    ("hf-trainer", "rng"): "rng_state.pth",
    ("hf-trainer", "step"): "trainer_state.json",
    ("accelerate", "model"): "model.safetensors",
    ("accelerate", "rng"): "random_states_0.pkl",
    ("deepspeed", "model"): "mp_rank_00_model_states.pt",
}
# Layouts whose folder names are steps, with the name pattern: only these names count as evidence.
STEP_NAMES: dict[str, re.Pattern[str]] = {
    "hf-trainer": re.compile(r"^checkpoint-(\d+)$"),
    "megatron": re.compile(r"^iter_(\d+)$"),
    "deepspeed": re.compile(r"^global_step(\d+)$"),
    "dcp": re.compile(r"^step-(\d+)$"),
}
# Layouts whose folder names are not steps at all (accelerate's checkpoint_<i> counts saves).
NAME_NOT_A_STEP = frozenset({"accelerate"})
# In-file step counters, most specific first; `epoch` is not a step.
STEP_KEYS = ("global_step", "global_steps", "iteration", "step")

# `training_args.bin` (Hugging Face Trainer) pickles its own argument classes. It is not training
# state and the auditor never loads it, so these imports are noted, not called unsafe.
TRAINER_ARGS_FILES = ("training_args.bin",)
TRAINER_ARGS_PREFIXES = (
    "transformers.training_args.", "transformers.training_args_seq2seq.", "transformers.trainer_utils.",
    "transformers.trainer_pt_utils.AcceleratorConfig", "accelerate.state.PartialState",
    "accelerate.utils.dataclasses.",
)
# Every file torch.load or pickle.load would be pointed at: decided by content, not by this list,
# which only says which files to look at.
PICKLE_SUFFIXES = (*pickles.TORCH_SUFFIXES, ".pkl")
DCP_METADATA = ".metadata"
MAX_JSON_BYTES = 64 * 2**20
MAX_STEP_JSON_BYTES = 2**20
# Our own manifests and index files: they state no step of the writer's.
MANIFEST_SUFFIXES = (MANIFEST_NAME, SIDECAR_SUFFIX, ".index.json")
# Bounds of the recognition walk: deep enough for DeepSpeed's nesting, cheap on huge state dicts.
MAX_DEPTH = 8
MAX_NODES = 500_000

_OPT_LEAVES = frozenset({"exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq", "square_avg", "sum",
                         "acc_delta", "ax", "eta", "mu"})
_OPT_NAMESPACES = frozenset({"optim", "optimizer", "optimizers", "optimizer_state", "optim_state", "optimizer_states"})
_SCHED_NAMESPACES = frozenset({"lr_scheduler", "lr_schedulers", "scheduler", "schedulers", "opt_param_scheduler"})
_SCHED_LEAVES = frozenset({"last_epoch", "base_lrs", "_last_lr", "_step_count"})
_PLATEAU_FIELDS = frozenset({"best", "num_bad_epochs", "patience", "mode", "cooldown_counter"})
_SCALER_FIELDS = frozenset({"scale", "growth_factor", "backoff_factor", "growth_interval"})
_TORCH_RNG_BYTES = 5056  # torch.get_rng_state() of the CPU MT19937 generator
_DEEPSPEED_SCALERS = frozenset({"deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"})


# ---------------------------------------------------------------- evidence


@dataclass
class Evidence:
    """What a checkpoint's files hold, recognised by structure."""

    components: dict[str, set[str]] = field(default_factory=lambda: {c: set() for c in COMPONENTS})
    steps: dict[str, int] = field(default_factory=dict)  # where a step was read -> the step
    parsed: set[str] = field(default_factory=set)  # files read completely as what they are
    unproven: set[str] = field(default_factory=set)  # of those, files whose data bytes nothing checked
    optimizers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # file-level optimizer state
    schedulers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    rng_kinds: dict[str, set[str]] = field(default_factory=dict)  # file -> python, numpy, torch, cuda
    megatron_args: dict[str, Any] | None = None
    # safetensors headers parsed, by file: their __metadata__ may carry a foreign digest (modelspec)
    headers: dict[str, formats.SafetensorsHeader] = field(default_factory=dict)

    def add(self, component: str, rel: str) -> None:
        self.components[component].add(rel)

    def has(self, component: str) -> bool:
        return bool(self.components[component])


@dataclass
class CompletenessResult:
    """What the completeness check found, for the engine to fold into the verdict."""

    findings: list[Finding]
    parsed: set[str]  # files read completely (structural coverage)
    # The checkpoint's step: what the evidence shows, else the name's guess where the layout's names
    # may be steps; None when nothing says (accelerate's checkpoint_<i> counts saves, not steps).
    step: int | None
    components: dict[str, list[str]]  # component -> the files that hold it
    # Where a step was read (manifest, trainer_state.json, a file, the folder name) -> that step.
    step_sources: dict[str, int] = field(default_factory=dict)
    headers: dict[str, formats.SafetensorsHeader] = field(default_factory=dict)  # safetensors headers read


class _Walk:
    """One bounded recursive walk of a skeleton value, adding what it recognises to the evidence."""

    def __init__(self, ev: Evidence, rel: str) -> None:
        self.ev = ev
        self.rel = rel
        self.nodes = 0
        self.step: tuple[int, int] | None = None  # (priority, value) of the best in-file step

    def visit(self, value: Any, depth: int = 0) -> None:
        self.nodes += 1
        if depth > MAX_DEPTH or self.nodes > MAX_NODES:
            return
        if isinstance(value, Mapping):
            self._mapping(value, depth)
        elif isinstance(value, (list, tuple)):
            self._sequence(value, depth)
        elif isinstance(value, pickles.TensorRef):
            self._tensor(value)
        elif isinstance(value, pickles.Opaque):
            self._opaque(value, depth)

    def _mapping(self, m: Mapping[Any, Any], depth: int) -> None:
        if is_optimizer_state(m):
            self.ev.add("optimizer", self.rel)
            if depth == 0:
                self.ev.optimizers.append((self.rel, dict(m)))
            return  # its per-parameter `step` counters are not training steps
        if is_scheduler_state(m):
            self.ev.add("scheduler", self.rel)
            if depth == 0 or "last_epoch" in m:
                self.ev.schedulers.append((self.rel, dict(m)))
            return
        if is_scaler_state(m):
            self.ev.add("scaler", self.rel)
            return
        rng = any(rng_kind(v) for v in m.values())
        if not rng and is_model_state(m):
            self.ev.add("model", self.rel)
            return
        if not rng and depth <= 1:
            self._step(m)
        for key, v in m.items():
            if key == "args" and isinstance(v, pickles.Opaque) and v.name == "argparse.Namespace":
                self.ev.megatron_args = v.state if isinstance(v.state, dict) else {}
                continue
            self.visit(v, depth + 1)

    def _sequence(self, s: list[Any] | tuple[Any, ...], depth: int) -> None:
        kind = rng_kind(s)
        if kind:
            self._rng(kind)
            return
        for v in s[:10_000]:
            self.visit(v, depth + 1)

    def _tensor(self, t: pickles.TensorRef) -> None:
        kind = rng_kind(t)
        if kind:
            self._rng(kind)

    def _opaque(self, o: pickles.Opaque, depth: int) -> None:
        if o.name in _DEEPSPEED_SCALERS:
            self.ev.add("scaler", self.rel)
        elif o.name == "numpy.ndarray":
            return
        elif isinstance(o.state, dict) and not o.name.startswith("torch.distributed"):
            self.visit(o.state, depth + 1)

    def _rng(self, kind: str) -> None:
        self.ev.add("rng", self.rel)
        self.ev.rng_kinds.setdefault(self.rel, set()).add(kind)

    def _step(self, m: Mapping[Any, Any]) -> None:
        for priority, key in enumerate(STEP_KEYS):
            v = m.get(key)
            if type(v) is int and v >= 0 and (self.step is None or priority < self.step[0]):
                self.step = (priority, v)
                break
        ts = m.get("train_state")
        if isinstance(ts, Mapping) and type(ts.get("step")) is int and self.step is None:
            self.step = (len(STEP_KEYS), ts["step"])


def is_optimizer_state(m: Mapping[Any, Any]) -> bool:
    """A torch optimizer state_dict: `state` (mapping) and `param_groups` (mappings with `params`)."""
    groups = m.get("param_groups")
    return (isinstance(m.get("state"), Mapping) and isinstance(groups, list) and bool(groups)
            and all(isinstance(g, Mapping) and "params" in g for g in groups))


def is_scheduler_state(m: Mapping[Any, Any]) -> bool:
    """An LR scheduler's state_dict: torch's LRScheduler, ReduceLROnPlateau, Megatron's, DeepSpeed's."""
    keys = set(k for k in m if isinstance(k, str))
    if "last_epoch" in keys and keys & {"base_lrs", "_last_lr", "_step_count"}:
        return True
    if len(keys & _PLATEAU_FIELDS) >= 4:
        return True
    if "num_steps" in keys and keys & {"max_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style"}:
        return True  # Megatron's OptimizerParamScheduler
    return keys == {"last_batch_iteration"}  # DeepSpeed's WarmupLR / OneCycle family


def is_scaler_state(m: Mapping[Any, Any]) -> bool:
    """torch.amp.GradScaler's state_dict."""
    return _SCALER_FIELDS <= set(k for k in m if isinstance(k, str))


def is_model_state(m: Mapping[Any, Any]) -> bool:
    """A state dict: names to tensors, tensors at least half of the values."""
    tensors = sum(1 for k, v in m.items() if isinstance(k, str) and isinstance(v, pickles.TensorRef))
    return tensors >= 1 and tensors * 2 >= len(m)


def rng_kind(value: Any) -> str | None:
    """Name the generator whose state `value` is, by its shape (None: not an RNG state)."""
    if isinstance(value, pickles.TensorRef):
        if value.dtype == "uint8" and value.shape == (_TORCH_RNG_BYTES,):
            return "torch"
        return None
    if isinstance(value, tuple):
        if (len(value) == 3 and value[0] == 3 and isinstance(value[1], tuple) and len(value[1]) == 625
                and all(type(x) is int for x in value[1]) and (value[2] is None or isinstance(value[2], float))):
            return "python"
        if (len(value) == 5 and value[0] == "MT19937" and isinstance(value[1], pickles.Opaque)
                and value[1].name == "numpy.ndarray"):
            return "numpy"
    if (isinstance(value, Mapping) and value.get("bit_generator") == "MT19937"
            and isinstance(value.get("state"), Mapping)):
        return "numpy"
    if (isinstance(value, list) and value and all(isinstance(t, pickles.TensorRef) and t.dtype == "uint8"
                                                 and len(t.shape) == 1 for t in value)):
        return "cuda"  # torch.cuda.get_rng_state_all(): one byte tensor per device
    return None


def recognise(ev: Evidence, rel: str, value: Any) -> int | None:
    """Add what one file's skeleton holds to the evidence; return its in-file step, if any."""
    walk = _Walk(ev, rel)
    walk.visit(value)
    if isinstance(value, Mapping):
        cuda = value.get("cuda") or value.get("cuda_rng_state")
        if isinstance(cuda, pickles.TensorRef) and cuda.dtype == "uint8" and ev.rng_kinds.get(rel):
            ev.rng_kinds[rel].add("cuda")
    return walk.step[1] if walk.step else None


def recognise_dcp(ev: Evidence, rel: str, dcp: pickles.DcpCheckpoint) -> int | None:
    """Add what a torch.distributed.checkpoint's flattened keys hold; return `train_state.step`."""
    step = None
    for fqn, kind in dcp.keys.items():
        parts = re.split(r"[./]", fqn)
        head, leaf = parts[0], parts[-1]
        if head in _OPT_NAMESPACES or "param_groups" in parts or (kind == "tensor" and leaf in _OPT_LEAVES
                                                                  and "state" in parts):
            ev.add("optimizer", rel)
        elif head in _SCHED_NAMESPACES or (leaf in _SCHED_LEAVES and kind == "bytes"):
            ev.add("scheduler", rel)
        elif head in ("rng", "rng_state", "rng_states"):
            ev.add("rng", rel)
        elif kind == "tensor":
            ev.add("model", rel)
    for label, item in dcp.byte_items.items():
        fqn = label.split("@", 1)[0]
        if fqn in ("train_state.step", "step", "global_step") and type(item.value) is int:
            step = item.value
        if fqn.split("/", 1)[0] in ("rng_state", "rng_states", "rng") or rng_kind(item.value):
            _Walk(ev, rel).visit(item.value)
    return step


# ---------------------------------------------------------------- inventory (sealing)

_MODEL = re.compile(
    r"^(model|pytorch_model|adapter_model|consolidated|diffusion_pytorch_model)([-_.].*)?\.(safetensors|bin|pt|pth)$"
    r"|^model\.safetensors\.index\.json$|^mp_rank_\d+(_\d+)?/model_optim_rng\.pt$|^__\d+_\d+\.distcp$"
)
_OPTIMIZER = re.compile(
    r"(^|/)(optimizer|optim)([-_.].*)?\.(pt|pth|bin|safetensors)$"
    r"|^global_step\d+/.*optim_states\.pt$"
)
_SCHEDULER = re.compile(r"(^|/)(scheduler|lr_scheduler)([-_.].*)?\.(pt|pth|bin|json)$")
_RNG = re.compile(r"(^|/)rng_state(_\d+)?\.(pth|pt|json)$|(^|/)rng(_\d+)?\.(pt|pth|json)$"
                  r"|(^|/)random_states_\d+\.pkl$")
_SCALER = re.compile(r"(^|/)(scaler|grad_scaler)\.(pt|pth)$")


def inventory(paths: Iterable[str], *, step: int | None = None, fs: Any = None, root: str | None = None
              ) -> TrainingState:
    """Classify checkpoint files by the training-state component they hold.

    With `fs` and `root` (the folder the paths are relative to) every pickle and safetensors file is
    recognised by its contents, as verification does; files whose contents cannot be read, and
    every file without `fs`, fall back to the names writers conventionally give them.
    """
    paths = sorted(paths)
    ev = Evidence()
    if fs is not None and root is not None:
        for rel in paths:
            _inventory_one(fs, root, rel, ev)
    ts = TrainingState(step=step)
    for path in paths:
        if path in ev.parsed:
            continue
        name = path.rsplit("/", 1)[-1]
        if _RNG.search(path):
            ev.add("rng", path)
        elif _SCALER.search(path):
            ev.add("scaler", path)
        elif _OPTIMIZER.search(path):
            ev.add("optimizer", path)
        elif _SCHEDULER.search(path):
            ev.add("scheduler", path)
        elif _MODEL.search(name) or _MODEL.search(path):
            ev.add("model", path)
    if "mp_rank_00/model_optim_rng.pt" in ev.components["model"] and fs is None:
        # Megatron keeps model, optimizer and RNG of a rank in one file.
        for c in ("optimizer", "rng"):
            ev.components[c] |= {p for p in ev.components["model"] if p.endswith("model_optim_rng.pt")}
    ts.model = sorted(ev.components["model"])
    ts.optimizer = sorted(ev.components["optimizer"])
    ts.scheduler = sorted(ev.components["scheduler"])
    ts.rng = sorted(ev.components["rng"])
    ts.scaler = min(ev.components["scaler"]) if ev.components["scaler"] else None
    ts.world_size = max(1, len(ts.rng))
    return ts


def _inventory_one(fs: Any, root: str, rel: str, ev: Evidence) -> None:
    path = f"{root}/{rel}"
    try:
        if rel.endswith(PICKLE_SUFFIXES):
            skeleton = pickles.read_torch_skeleton(fs, path, plain_pickle=rel.endswith(".pkl"), writer_classes=True)
            recognise(ev, rel, skeleton.value)
            ev.parsed.add(rel)
        elif rel.endswith(".safetensors") and not rel.endswith(PROBE_SUFFIXES):
            with open_parsed(fs, path) as f:
                head = f.read(8)
            if len(head) == 8:
                ev.add("model", rel)
                ev.parsed.add(rel)
    except (ValueError, OSError) as e:  # refused or unreadable: named by convention instead
        logger.debug("inventory: %s not recognised by contents: %s", rel, e)


def step_from_trainer_state(data: bytes) -> int | None:
    """Read `global_step` from a Hugging Face `trainer_state.json`."""
    try:
        value = safejson.loads(data).get("global_step")
    except (ValueError, AttributeError):
        return None
    return value if type(value) is int else None


# ---------------------------------------------------------------- the check


def hook(require: list[str] | None = None) -> Any:
    """Return the verify hook that checks training-state completeness and pickle safety."""

    def check(reader: Any, ck: Any, manifest: Any, tier: str) -> CompletenessResult:
        return check_checkpoint(reader, ck, manifest, require=require)

    return check


def check_checkpoint(reader: Any, ck: Any, manifest: Any, *, require: list[str] | None = None) -> CompletenessResult:
    """Check that the state needed to resume is present and consistent; also refuse unsafe pickles."""
    findings: list[Finding] = []
    ev = Evidence()
    in_file = _scan_files(reader, ck, manifest, ev, findings)
    if any(f.code == "storage_error" for f in findings):
        return CompletenessResult(findings, set(), None, {})
    layout = writer_layout(ck)
    trainer_step = _trainer_step(reader, ck, ev, findings)
    step = _check_steps(ck, manifest, trainer_step, in_file, ev, findings)
    required = _required(layout, ck, manifest, ev, require)
    declared = manifest.training_state if manifest is not None else None
    for component in COMPONENTS:
        if component in required and not _present(component, ev, declared, ck, step):
            where = CONVENTIONAL_FILE.get((layout, component))
            findings.append(Finding.error(_MISSING_CODE[component], where,
                                    f"no {component} state found in any file"
                                    f"{f' (expected {where})' if where else ''}: {_why(layout, manifest, component)}"))
    if declared is not None:
        _check_declared(declared, ck, ev, findings)
    _check_rng_files(layout, ev, findings)
    for rel, opt in ev.optimizers:
        _check_optimizer(reader, ck, manifest, ev, opt, findings, rel)
    _check_schedulers(ev, step, findings)
    if ck.kind == "file" and ev.has("optimizer") and not ev.has("rng"):
        findings.append(Finding.info("rng_state_not_saved", ck.name,
                                "optimizer state but no RNG state: resumption is not bit-exact"))
    components = {c: sorted(ev.components[c]) for c in COMPONENTS if ev.components[c]}
    findings = _unique(findings)
    if step is None and layout not in NAME_NOT_A_STEP:
        step = ck.step
    return CompletenessResult(findings, ev.parsed - ev.unproven, step, components, dict(ev.steps), ev.headers)


def _unique(findings: list[Finding]) -> list[Finding]:
    """One finding per code and file: a component both required and declared is missing once."""
    seen: set[tuple[str, str | None]] = set()
    out = []
    for f in findings:
        if f.severity == Severity.ERROR and f.code in _MISSING_CODE.values():
            if (f.code, f.file) in seen:
                continue
            seen.add((f.code, f.file))
        out.append(f)
    return out


def _why(layout: str, manifest: Any, component: str) -> str:
    if manifest is not None and _declared_present(manifest.training_state, component):
        return "the manifest declares it"
    return f"the {layout} writer always saves it"


def _required(layout: str, ck: Any, manifest: Any, ev: Evidence, require: list[str] | None) -> set[str]:
    """The components this checkpoint must hold: the configured ones, else its writer's; for a
    sealed checkpoint what the manifest declares instead of the writer's always-written set."""
    group = TOGETHER.get(layout, ())
    declared = manifest.training_state if manifest is not None else None
    if require is not None:
        needed = set(require)
    elif declared is not None:
        # The writer declared what it wrote: a component declared absent is not missing, except
        # where the layout's writer saves components only together.
        needed = {"step"} | {c for c in COMPONENTS if _declared_present(declared, c)}
        if any(ev.has(c) or _declared_present(declared, c) for c in group):
            needed |= set(group)
    else:
        needed = set(ALWAYS_WRITES.get(layout, ("model",)))
        if any(ev.has(c) for c in group):
            needed |= set(group)
        if layout == "megatron" and ev.megatron_args is not None:
            # Megatron-LM writes no optimizer / RNG state when told not to, and says so in args.
            if ev.megatron_args.get("no_save_optim") is True:
                needed.discard("optimizer")
            if ev.megatron_args.get("no_save_rng") is True:
                needed.discard("rng")
    if manifest is not None and manifest.run and manifest.run.config and _mixed_precision(manifest.run.config):
        needed.add("scaler")
    return needed


def _declared_present(ts: TrainingState, component: str) -> bool:
    if component == "step":
        return ts.step is not None
    value = getattr(ts, component)
    return bool(value) if isinstance(value, list) else value is not None


def _present(component: str, ev: Evidence, declared: TrainingState | None, ck: Any, step: int | None) -> bool:
    if component == "step":
        return step is not None
    if ev.has(component):
        return True
    if declared is not None and _declared_present(declared, component):
        # Declared in a file we could not parse (JSON RNG, an unknown format): the manifest's word
        # stands unless the file was read and holds no such state (_check_declared).
        files = getattr(declared, component)
        files = files if isinstance(files, list) else [files]
        return any(f in ck.files and f not in ev.parsed for f in files)
    return False


def _check_declared(declared: TrainingState, ck: Any, ev: Evidence, findings: list[Finding]) -> None:
    """A file the manifest says holds a component, read completely, must hold it."""
    for component in ("model", "optimizer", "scheduler", "rng", "scaler"):
        files = getattr(declared, component)
        for rel in files if isinstance(files, list) else [files] if files else []:
            if rel in ev.parsed and rel not in ev.components[component] and not rel.endswith(".json"):
                findings.append(Finding.error(_MISSING_CODE[component], rel,
                                        f"the manifest says it holds {component} state; its contents hold none"))


def _mixed_precision(config: dict[str, Any]) -> bool:
    return any(bool(config.get(k)) for k in ("fp16", "mixed_precision", "amp", "grad_scaler")) and str(
        config.get("mixed_precision", "")
    ).lower() not in ("no", "bf16", "false")


# ---------------------------------------------------------------- reading the files


def _scan_files(reader: Any, ck: Any, manifest: Any, ev: Evidence, findings: list[Finding]) -> dict[str, int]:
    """Read every pickle's skeleton (never loading), DCP metadata and safetensors header; return the
    in-file steps by file."""
    sealed = {e.path: e.size for e in manifest.files} if manifest is not None else {}
    steps: dict[str, int] = {}
    for rel in sorted(ck.files):
        name = rel.rsplit("/", 1)[-1]
        try:
            if name == DCP_METADATA:
                step = _scan_dcp(reader, ck, rel, ev, findings)
            elif rel.endswith(PICKLE_SUFFIXES) or (ck.kind == "file" and rel == ck.name
                                                   and not rel.endswith(".safetensors")):
                # A single file is a checkpoint because its contents are a torch.save file.
                step = _scan_pickle(reader, ck, rel, ev, findings, sealed)
            elif rel.endswith(".safetensors") and not rel.endswith(PROBE_SUFFIXES):
                _scan_safetensors(reader, ck, rel, ev)
                step = None
            elif rel.endswith(".json") and rel != "trainer_state.json" and not rel.endswith(MANIFEST_SUFFIXES):
                step = _scan_json(reader, ck, rel)
            else:
                step = None
        except FileNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001 - storage backends raise their own types
            findings.append(Finding.error("storage_error", rel, f"{type(e).__name__}: {e}"))
            continue
        if step is not None:
            steps[rel] = step
    return steps


def _scan_pickle(reader: Any, ck: Any, rel: str, ev: Evidence, findings: list[Finding],
                 sealed: dict[str, int]) -> int | None:
    try:
        # A .pkl may be meant for pickle.load; the torch suffixes must be torch.save files.
        path = f"{ck.root}/{rel}"
        with reader.open_parsed(path) as f:
            skeleton = pickles.read_torch_skeleton_from(f, path, plain_pickle=rel.endswith(".pkl"), writer_classes=True)
    except pickles.UnknownFormatError as e:
        # Raw data under a torch suffix: nothing in it would be unpickled, and nothing is vouched for.
        findings.append(Finding.info("not_a_pickle", rel, f"neither a torch.save zip nor a pickle: {e}"))
        return None
    except pickles.UnsafePickleError as e:
        findings.append(_unsafe_finding(ck, rel, e, sealed))
        return None
    ev.parsed.add(rel)
    if skeleton.format == "legacy":
        # A plain pickle is all pickle, and a zip's directory and every pickle member were read; a
        # legacy stream's tensor bytes follow its pickles with no checksum, so nothing proved them.
        ev.unproven.add(rel)
    if skeleton.writer_classes:
        findings.append(Finding.info("writer_classes", rel,
                                f"pickles {', '.join(sorted(skeleton.writer_classes))}, which its writer always "
                                "saves; read as data, never loaded (torch.load would need weights_only=False)"))
    return recognise(ev, rel, skeleton.value)


def _scan_json(reader: Any, ck: Any, rel: str) -> int | None:
    """A small JSON file beside the state (a hand loop's meta.json) may state the step at its top."""
    size = int(ck.files[rel].get("size") or 0)
    if size > MAX_STEP_JSON_BYTES:
        return None
    try:
        doc = safejson.loads(reader.read(f"{ck.root}/{rel}", limit=MAX_STEP_JSON_BYTES))
    except ValueError:
        return None  # the structural check reports invalid JSON
    if not isinstance(doc, dict):
        return None
    for key in STEP_KEYS:
        if type(doc.get(key)) is int and doc[key] >= 0:
            return int(doc[key])
    return None


def _scan_safetensors(reader: Any, ck: Any, rel: str, ev: Evidence) -> None:
    path = f"{ck.root}/{rel}"
    try:
        header = formats.parse_safetensors_header(reader, path, int(ck.files[rel].get("size") or 0))
    except formats.FormatError:
        return  # the structural check reports it
    ev.parsed.add(rel)
    ev.headers[rel] = header
    if header.tensors:
        ev.add("model", rel)


def _scan_dcp(reader: Any, ck: Any, rel: str, ev: Evidence, findings: list[Finding]) -> int | None:
    """Check a DCP `.metadata` (plain pickle.load in torch) and the byte items it points at."""
    folder = f"{ck.root}/{rel}".rsplit("/", 1)[0]
    try:
        dcp = pickles.read_dcp_checkpoint(reader.fs, folder)
    except pickles.UnknownFormatError as e:
        findings.append(Finding.info("not_a_pickle", rel, f"DCP metadata that is not a pickle: {e}"))
        return None
    except pickles.UnsafePickleError as e:
        # A byte item's label is `<folder>/<file>@<offset>`: name the .distcp file it lives in.
        where = e.path[len(folder) + 1:].split("@", 1)[0] if e.path.startswith(folder + "/") else rel
        where = rel.rsplit("/", 1)[0] + "/" + where if "/" in rel else where
        problems = e.names + e.reasons
        if not e.names and e.reasons and all(r.startswith(DAMAGE_REASONS) for r in e.reasons):
            # Cut short: the extents check reports the .distcp file truncated. Still never loaded.
            findings.append(Finding.warning("pickle_unreadable", where, f"damaged, not loaded: {problems[0]}"))
            return None
        findings.append(Finding.error("unsafe_pickle", where,
                                f"torch.distributed.checkpoint would unpickle {', '.join(problems[:5])[:500]}; "
                                "refused, never executed"))
        return None
    ev.parsed.add(rel)
    return recognise_dcp(ev, rel, dcp)


# Reasons the skeleton reader gives for a zip or DCP item cut short, which the format checks also see.
DAMAGE_REASONS = ("unreadable zip archive", "byte item runs past the end", "member data runs past the end")


def _unsafe_finding(ck: Any, rel: str, e: pickles.UnsafePickleError, sealed: dict[str, int]) -> Finding:
    """The finding for a refused file: unsafe, unless it is damage already proven or trainer args."""
    size = ck.files.get(rel, {}).get("size")
    resized = rel in sealed and size is not None and int(size) != sealed[rel]
    # A zip whose directory cannot be read is damaged as a zip first: the structural check reports
    # that file corrupt (truncated, header_invalid); a raw pickle that breaks has no such evidence
    # and stays unsafe (fail closed).
    broken_zip = bool(e.reasons) and not e.names and all(r.startswith(DAMAGE_REASONS) for r in e.reasons)
    if (resized and e.reasons) or (e.damaged and not e.imports) or broken_zip:
        # Cut short since sealing, or a pickle member failing its CRC: the size or CRC check
        # already makes it corrupt, and these oddities are what that damage looks like. A named
        # import is never explained away. Still refused, never loaded.
        return Finding.warning("pickle_unreadable", rel, f"damaged, not loaded: {'; '.join(e.globals)[:500]}")
    if e.reasons:
        seen = f"; before that it imports {', '.join(e.names[:5])}" if e.names else ""
        return Finding.error("unsafe_pickle", rel,
                       f"cannot be parsed completely, so refused, never executed: {'; '.join(e.reasons)[:500]}{seen}")
    bad = e.names
    if rel.rsplit("/", 1)[-1] in TRAINER_ARGS_FILES:
        known = [g for g in bad if g.startswith(TRAINER_ARGS_PREFIXES) and ":" not in g]
        if known and len(known) == len(bad):
            return Finding.info("trainer_args_pickle", rel,
                           "imports transformers argument classes; never loaded by the auditor")
    return Finding.error("unsafe_pickle", rel, f"loading would import {', '.join(bad[:5])}; refused, never executed")


def _trainer_step(reader: Any, ck: Any, ev: Evidence, findings: list[Finding]) -> int | None:
    if "trainer_state.json" not in ck.files:
        return None
    try:
        data = reader.read(f"{ck.root}/trainer_state.json", limit=MAX_JSON_BYTES)
    except (ValueError, FileNotFoundError):
        return None
    step = step_from_trainer_state(data)
    if step is not None:
        ev.parsed.add("trainer_state.json")
    return step


# ---------------------------------------------------------------- consistency

# accelerate's save_state names: `optimizer.bin`, `optimizer_1.bin`, `scheduler.bin`, `sampler.bin`,
# `custom_checkpoint_0.pkl`. No other writer uses `.bin` for optimizer state.
_ACCELERATE_FILES = re.compile(r"^(?:optimizer|scheduler|sampler)(?:_\d+)?\.bin$|^custom_checkpoint_\d+\.pkl$")


def writer_layout(ck: Any) -> str:
    """The checkpoint's layout, with a folder that lost its marker given back to its writer.

    layouts.py recognises accelerate by `random_states_<rank>.pkl`; a folder without it but with
    the other files only accelerate's save_state writes is an accelerate checkpoint missing its RNG
    state, not a folder that needs nothing but a model.
    """
    if ck.layout == "folder" and ck.kind == "dir" and any(_ACCELERATE_FILES.match(rel) for rel in ck.files):
        return "accelerate"
    return ck.layout



def name_step(ck: Any) -> int | None:
    """The step a checkpoint's folder name states, for the layouts whose names are steps."""
    pattern = STEP_NAMES.get(ck.layout)
    if pattern is None or ck.kind != "dir":
        return None
    m = pattern.match(ck.name)
    return int(m.group(1)) if m else None


def _check_steps(ck: Any, manifest: Any, trainer_step: int | None, in_file: dict[str, int], ev: Evidence,
                 findings: list[Finding]) -> int | None:
    """Compare every step the evidence states; return the checkpoint's step."""
    seen: dict[str, int] = {}
    if manifest is not None and manifest.step is not None:
        seen["manifest"] = manifest.step
    if trainer_step is not None:
        seen["trainer_state.json"] = trainer_step
    for rel, value in sorted(in_file.items()):
        seen[rel] = value
    named = name_step(ck)
    if named is not None:
        seen["folder name"] = named
    ev.steps = seen
    if len(set(seen.values())) > 1:
        findings.append(Finding.error("step_mismatch", None,
                                "steps disagree: " + ", ".join(f"{k} {v}" for k, v in seen.items())))
    if seen:
        return next(iter(seen.values()))
    return None


def _check_schedulers(ev: Evidence, step: int | None, findings: list[Finding]) -> None:
    top = [opt for rel, opt in ev.optimizers]
    for rel, sched in ev.schedulers:
        base = sched.get("base_lrs")
        groups = [len(o.get("param_groups", [])) for o in top]
        if isinstance(base, list) and len(groups) == 1 and groups[0] and len(base) != groups[0]:
            findings.append(Finding.error("param_group_mismatch", rel,
                                    f"scheduler has {len(base)} param groups, optimizer {groups[0]}"))
        if len(set(sched) & _PLATEAU_FIELDS) >= 4:
            continue  # ReduceLROnPlateau counts metric evaluations: no step to compare with
        counter = sched.get("last_epoch", sched.get("num_steps"))
        if type(counter) is int and step is not None and counter != step:
            # Per-epoch and plateau schedulers, and steps a grad scaler skipped, all disagree legitimately.
            findings.append(Finding.warning("scheduler_step_differs", rel,
                                    f"scheduler counter {counter}, step {step}"))


def _check_rng_files(layout: str, ev: Evidence, findings: list[Finding]) -> None:
    """A Trainer RNG file holds Python, NumPy and torch CPU generators together."""
    if layout != "hf-trainer":
        return
    for rel, kinds in sorted(ev.rng_kinds.items()):
        missing = [k for k in ("python", "numpy", "torch") if k not in kinds]
        if missing:
            findings.append(Finding.error("rng_state_missing", rel, f"no {', '.join(missing)} generator state"))


def _param_shapes(reader: Any, ck: Any, ev: Evidence) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for rel in sorted(ev.components["model"]):
        if rel.endswith(".safetensors"):
            path = f"{ck.root}/{rel}"
            try:
                header = formats.parse_safetensors_header(reader, path, int(reader.info(path)["size"]))
            except (formats.FormatError, FileNotFoundError):
                continue
            shapes.update({t.name: t.shape for t in header.tensors})
    return shapes


def _check_optimizer(reader: Any, ck: Any, manifest: Any, ev: Evidence, opt: dict[str, Any],
                     findings: list[Finding], rel: str) -> None:
    """Every trainable parameter has optimizer state of its own shape; groups agree."""
    groups = opt["param_groups"]
    per_param = opt["state"]
    ids = [p for g in groups for p in g.get("params", [])]
    names = _param_names(groups, manifest, len(ids))
    stateful = bool(per_param) or any("betas" in g for g in groups)
    if not stateful:
        return  # plain SGD keeps no per-parameter state
    cold = [p for p in ids if p not in per_param]
    if cold and len(cold) == len(ids):
        findings.append(Finding.error("optimizer_state_missing", rel,
                                f"optimizer holds no state for any of its {len(ids)} parameters"))
        return
    if cold:
        shown = [names.get(p, f"param #{p}") for p in cold]
        findings.append(Finding.error("cold_optimizer_params", rel,
                                f"no optimizer state for {len(cold)} parameter(s): {', '.join(map(str, shown[:10]))}"))
    if not names:
        return
    shapes = _param_shapes(reader, ck, ev)
    if not shapes:
        return
    wrong = []
    for p, entry in per_param.items():
        name = names.get(p)
        if name is None or name not in shapes or not isinstance(entry, dict):
            continue
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            t = entry.get(key)
            if t is not None and hasattr(t, "shape") and tuple(t.shape) != tuple(shapes[name]):
                wrong.append(f"{name}.{key} {list(t.shape)} vs {list(shapes[name])}")
    if wrong:
        findings.append(Finding.error("optimizer_shape_mismatch", rel, "; ".join(wrong[:10])))


def _param_names(groups: list[dict[str, Any]], manifest: Any, count: int) -> dict[Any, str]:
    """Map optimizer parameter ids to names: from the state_dict (torch ≥ 2.5) or the manifest."""
    names: dict[Any, str] = {}
    for g in groups:
        if isinstance(g.get("param_names"), list) and len(g["param_names"]) == len(g.get("params", [])):
            names.update(zip(g["params"], g["param_names"], strict=True))
    recorded = getattr(manifest.training_state, "param_names", None) if manifest else None
    if not names and isinstance(recorded, list) and len(recorded) == count:
        ids = [p for g in groups for p in g.get("params", [])]
        names = dict(zip(ids, recorded, strict=False))  # both lengths checked against `count`
    return names
