"""Training-state inventory: which files hold model, optimizer, scheduler, RNG, scaler, step."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from auditor import pickles, safejson
from auditor.manifest import TrainingState
from auditor.verify import Finding

_MODEL = re.compile(
    r"^(model|pytorch_model|adapter_model|consolidated|diffusion_pytorch_model)([-_.].*)?\.(safetensors|bin|pt|pth)$"
    r"|^model\.safetensors\.index\.json$|^mp_rank_\d+(_\d+)?/model_optim_rng\.pt$|^__\d+_\d+\.distcp$"
)
_OPTIMIZER = re.compile(r"(^|/)(optimizer|optim)([-_.].*)?\.(pt|pth|bin|safetensors)$|^global_step\d+/.*optim_states\.pt$")
_SCHEDULER = re.compile(r"(^|/)(scheduler|lr_scheduler)([-_.].*)?\.(pt|pth|bin|json)$")
_RNG = re.compile(r"(^|/)rng_state(_\d+)?\.(pth|pt|json)$|(^|/)rng(_\d+)?\.(pt|pth|json)$")
_SCALER = re.compile(r"(^|/)(scaler|grad_scaler)\.(pt|pth)$")


def inventory(paths: Iterable[str], *, step: int | None = None) -> TrainingState:
    """Classify checkpoint files by the training-state component they hold, from their names."""
    ts = TrainingState(step=step)
    for path in sorted(paths):
        name = path.rsplit("/", 1)[-1]
        if _RNG.search(path):
            ts.rng.append(path)
        elif _SCALER.search(path):
            ts.scaler = path
        elif _OPTIMIZER.search(path):
            ts.optimizer.append(path)
        elif _SCHEDULER.search(path):
            ts.scheduler.append(path)
        elif _MODEL.search(name) or _MODEL.search(path):
            ts.model.append(path)
    if "mp_rank_00/model_optim_rng.pt" in ts.model:
        # Megatron keeps model, optimizer and RNG of a rank in one file.
        ts.optimizer += [p for p in ts.model if p.endswith("model_optim_rng.pt")]
        ts.rng += [p for p in ts.model if p.endswith("model_optim_rng.pt")]
    ts.world_size = max(1, len(ts.rng))
    return ts


def step_from_trainer_state(data: bytes) -> int | None:
    """Read `global_step` from a Hugging Face `trainer_state.json`."""
    try:
        value = safejson.loads(data).get("global_step")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


# ---------------------------------------------------------------- completeness checks

COMPONENTS = ("model", "optimizer", "scheduler", "rng", "scaler", "step")
# What each layout must hold to resume, unless the prefix configures `require`.
DEFAULT_REQUIRE: dict[str, tuple[str, ...]] = {
    "hf-trainer": ("model", "optimizer", "scheduler", "rng", "step"),
    "manifest": ("model", "optimizer", "rng", "step"),
    "dcp": ("model", "optimizer", "step"),
    "megatron": ("model", "optimizer", "rng", "step"),
    "orbax": ("model", "step"),
    "single-file": ("model",),  # often a weights-only export; configure `require` to demand more
    "lightning": ("model", "optimizer", "step"),
    "hf-model": ("model",),
    "unknown": ("model",),
}
_MISSING_CODE = {c: f"{c}_state_missing" for c in ("model", "optimizer", "scheduler", "rng", "scaler")} | {
    "step": "step_missing"
}


def hook(require: list[str] | None = None) -> Any:
    """Return the verify hook that checks training-state completeness and pickle safety."""

    def check(reader: Any, ck: Any, manifest: Any, tier: str) -> list[Any]:
        return check_checkpoint(reader, ck, manifest, require=require)

    return check



def check_checkpoint(reader: Any, ck: Any, manifest: Any, *, require: list[str] | None = None) -> list[Any]:
    """Check that the state needed to resume is present and consistent; also refuse unsafe pickles."""
    findings: list[Finding] = []
    unsafe, values = _scan_pickles(reader, ck, manifest, findings)
    if any(f.code == "storage_error" for f in findings):
        return findings
    layout = _layout(ck)
    state = manifest.training_state if manifest else inventory(ck.files, step=ck.step)
    trainer_step = None
    if "trainer_state.json" in ck.files:
        trainer_step = step_from_trainer_state(reader.read(f"{ck.path}/trainer_state.json", limit=64 * 2**20))
    if manifest is None:
        state.step = trainer_step
    if ck.kind == "file" and not state.model:
        state.model = [ck.name]
    needed = tuple(require) if require is not None else DEFAULT_REQUIRE.get(layout, ("model",))
    if manifest is not None and manifest.run and manifest.run.config and _mixed_precision(manifest.run.config):
        needed = (*needed, "scaler")
    lightning = None
    if layout == "lightning" and ck.name not in unsafe:
        lightning = _load(values, ck.name)
        if isinstance(lightning, dict):
            _lightning(lightning, state, findings, ck.name)
    present = {
        "model": bool(state.model),
        "optimizer": bool(state.optimizer),
        "scheduler": bool(state.scheduler),
        "rng": bool(state.rng),
        "scaler": state.scaler is not None,
        "step": state.step is not None or ck.step is not None,
    }
    for component in needed:
        if component in present and not present[component]:
            findings.append(Finding(_MISSING_CODE[component], "error", None,
                                    f"no {component} state: a {layout} checkpoint needs it to resume"))
    if layout == "lightning" and not state.rng:
        findings.append(Finding("rng_state_not_saved", "info", ck.name,
                                "Lightning checkpoints store no RNG state; resumption is not bit-exact"))
    _check_steps(ck, manifest, state, trainer_step, findings)
    optimizer = None
    for rel in state.optimizer:
        if rel in unsafe or ck.kind == "file":
            continue
        optimizer = _load(values, rel)
        if isinstance(optimizer, dict):
            _check_optimizer(reader, ck, manifest, state, optimizer, findings, rel)
    scheduler = None
    for rel in state.scheduler:
        if rel in unsafe or rel.endswith(".json"):
            continue
        scheduler = _load(values, rel)
        if isinstance(scheduler, dict) and isinstance(optimizer, dict):
            groups = len(optimizer.get("param_groups", []))
            base = scheduler.get("base_lrs")
            if isinstance(base, list) and groups and len(base) != groups:
                findings.append(Finding("param_group_mismatch", "error", rel,
                                        f"scheduler has {len(base)} param groups, optimizer {groups}"))
        if isinstance(scheduler, dict):
            _check_scheduler_step(scheduler, state, findings, rel, layout)
    if ck.kind != "file":
        _check_rng(values, state, unsafe, findings)
    return findings


def _layout(ck: Any) -> str:
    if ck.kind == "file" and ck.name.endswith(".ckpt"):
        return "lightning"
    return ck.layout


def _mixed_precision(config: dict[str, Any]) -> bool:
    return any(bool(config.get(k)) for k in ("fp16", "mixed_precision", "amp", "grad_scaler")) and str(
        config.get("mixed_precision", "")
    ).lower() not in ("no", "bf16", "false")


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
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
DCP_METADATA = ".metadata"


def _scan_pickles(reader: Any, ck: Any, manifest: Any, findings: list[Any]) -> tuple[set[str], dict[str, Any]]:
    """Read every pickle's skeleton, never loading; return the refused files (already reported) and
    the skeleton values of the safe ones, by relative path."""
    unsafe: set[str] = set()
    values: dict[str, Any] = {}
    sealed = {e.path: e.size for e in manifest.files} if manifest is not None else {}
    for rel in sorted(ck.files):
        name = rel.rsplit("/", 1)[-1]
        if name == DCP_METADATA:
            _scan_dcp(reader, ck, rel, unsafe, findings)
            continue
        if not rel.endswith(PICKLE_SUFFIXES):
            continue
        try:
            # A .pkl may be meant for pickle.load; the torch suffixes must be torch.save files.
            values[rel] = pickles.read_torch_skeleton(reader.fs, f"{ck.root}/{rel}",
                                                      plain_pickle=rel.endswith(".pkl")).value
        except pickles.UnknownFormatError as e:
            # Raw data under a torch suffix: nothing in it would be unpickled, and nothing is vouched for.
            findings.append(Finding("not_a_pickle", "info", rel, f"neither a torch.save zip nor a pickle: {e}"))
        except pickles.UnsafePickleError as e:
            unsafe.add(rel)
            findings.append(_unsafe_finding(ck, rel, e, sealed))
        except FileNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001 - storage backends raise their own types
            findings.append(Finding("storage_error", "error", rel, f"{type(e).__name__}: {e}"))
    return unsafe, values


def _unsafe_finding(ck: Any, rel: str, e: pickles.UnsafePickleError, sealed: dict[str, int]) -> Any:
    """The finding for a refused file: unsafe, unless it is damage already proven or trainer args."""
    size = ck.files.get(rel, {}).get("size")
    resized = rel in sealed and size is not None and int(size) != sealed[rel]
    if (resized and e.reasons) or (e.damaged and not e.imports):
        # Cut short since sealing, or a pickle member failing its CRC: the size or CRC check
        # already makes it corrupt, and these oddities are what that damage looks like. A named
        # import is never explained away. Still refused, never loaded.
        return Finding("pickle_unreadable", "warning", rel, f"damaged, not loaded: {'; '.join(e.globals)[:500]}")
    if e.reasons:
        seen = f"; before that it imports {', '.join(e.names[:5])}" if e.names else ""
        return Finding("unsafe_pickle", "error", rel,
                       f"cannot be parsed completely, so refused, never executed: {'; '.join(e.reasons)[:500]}{seen}")
    bad = e.names
    if rel.rsplit("/", 1)[-1] in TRAINER_ARGS_FILES:
        known = [g for g in bad if g.startswith(TRAINER_ARGS_PREFIXES) and ":" not in g]
        if known and len(known) == len(bad):
            return Finding("trainer_args_pickle", "info", rel,
                           "imports transformers argument classes; never loaded by the auditor")
    return Finding("unsafe_pickle", "error", rel, f"loading would import {', '.join(bad[:5])}; refused, never executed")


def _scan_dcp(reader: Any, ck: Any, rel: str, unsafe: set[str], findings: list[Any]) -> None:
    """Check a DCP `.metadata` (plain pickle.load in torch) and the byte items it points at."""
    folder = f"{ck.root}/{rel}".rsplit("/", 1)[0]
    try:
        pickles.read_dcp_checkpoint(reader.fs, folder)
    except pickles.UnknownFormatError as e:
        findings.append(Finding("not_a_pickle", "info", rel, f"DCP metadata that is not a pickle: {e}"))
    except pickles.UnsafePickleError as e:
        # A byte item's label is `<folder>/<file>@<offset>`: name the .distcp file it lives in.
        where = e.path[len(folder) + 1:].split("@", 1)[0] if e.path.startswith(folder + "/") else rel
        where = rel.rsplit("/", 1)[0] + "/" + where if "/" in rel else where
        unsafe.add(where)
        problems = e.names + e.reasons
        findings.append(Finding("unsafe_pickle", "error", where,
                                f"torch.distributed.checkpoint would unpickle {', '.join(problems[:5])[:500]}; "
                                "refused, never executed"))
    except FileNotFoundError:
        return
    except Exception as e:  # noqa: BLE001 - storage backends raise their own types
        findings.append(Finding("storage_error", "error", rel, f"{type(e).__name__}: {e}"))


def _load(values: dict[str, Any], rel: str) -> Any:
    """The skeleton of a scanned, safe file (None when it was refused or unreadable)."""
    return values.get(rel)


def _lightning(obj: dict[str, Any], state: TrainingState, findings: list[Any], rel: str) -> None:
    state.model = [rel] if isinstance(obj.get("state_dict"), dict) else []
    if obj.get("optimizer_states"):
        state.optimizer = [rel]
    if obj.get("lr_schedulers"):
        state.scheduler = [rel]
    if isinstance(obj.get("global_step"), int):
        state.step = state.step if state.step is not None else obj["global_step"]


def _check_steps(ck: Any, manifest: Any, state: TrainingState, trainer_step: int | None, findings: list[Any]) -> None:
    seen: dict[str, int] = {}
    if ck.step is not None and ck.kind == "dir":
        seen["folder name"] = ck.step
    if manifest is not None:
        seen["manifest"] = manifest.step
    if trainer_step is not None:
        seen["trainer_state.json"] = trainer_step
    if len(set(seen.values())) > 1:
        findings.append(Finding("step_mismatch", "error", None,
                                "steps disagree: " + ", ".join(f"{k} {v}" for k, v in seen.items())))
    if seen and state.step is None:
        state.step = next(iter(seen.values()))


def _check_scheduler_step(scheduler: dict[str, Any], state: TrainingState, findings: list[Any], rel: str,
                          layout: str) -> None:
    last = scheduler.get("last_epoch")
    if not isinstance(last, int) or state.step is None or last == state.step:
        return
    # The Trainer steps its scheduler once per optimizer step; other loops may step per epoch.
    severity = "error" if layout == "hf-trainer" else "info"
    findings.append(Finding("step_mismatch", severity, rel, f"scheduler last_epoch {last}, step {state.step}"))


def _param_shapes(reader: Any, ck: Any, state: TrainingState) -> dict[str, tuple[int, ...]]:
    from auditor import formats

    shapes: dict[str, tuple[int, ...]] = {}
    for rel in state.model:
        if rel.endswith(".safetensors"):
            path = f"{ck.root}/{rel}"
            try:
                header = formats.parse_safetensors_header(reader, path, int(reader.info(path)["size"]))
            except (formats.FormatError, FileNotFoundError):
                continue
            shapes.update({t.name: t.shape for t in header.tensors})
    return shapes


def _check_optimizer(reader: Any, ck: Any, manifest: Any, state: TrainingState, opt: dict[str, Any],
                     findings: list[Any], rel: str) -> None:
    """Every trainable parameter has optimizer state of its own shape; groups agree."""
    groups = opt.get("param_groups")
    per_param = opt.get("state")
    if not isinstance(groups, list) or not isinstance(per_param, dict):
        findings.append(Finding("optimizer_state_missing", "error", rel, "not an optimizer state_dict"))
        return
    ids = [p for g in groups for p in g.get("params", [])]
    names = _param_names(groups, manifest, len(ids))
    stateful = bool(per_param) or any("betas" in g for g in groups)
    if not stateful:
        return  # plain SGD keeps no per-parameter state
    cold = [p for p in ids if p not in per_param]
    if cold and len(cold) == len(ids):
        findings.append(Finding("optimizer_state_missing", "error", rel,
                                f"optimizer holds no state for any of its {len(ids)} parameters"))
        return
    if cold:
        shown = [names.get(p, f"param #{p}") for p in cold]
        findings.append(Finding("cold_optimizer_params", "error", rel,
                                f"no optimizer state for {len(cold)} parameter(s): {', '.join(map(str, shown[:10]))}"))
    shapes = _param_shapes(reader, ck, state)
    if not names or not shapes:
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
        findings.append(Finding("optimizer_shape_mismatch", "error", rel, "; ".join(wrong[:10])))


def _param_names(groups: list[dict[str, Any]], manifest: Any, count: int) -> dict[Any, str]:
    """Map optimizer parameter ids to names: from the state_dict (torch ≥ 2.5) or the manifest."""
    names: dict[Any, str] = {}
    for g in groups:
        if isinstance(g.get("param_names"), list) and len(g["param_names"]) == len(g.get("params", [])):
            names.update(zip(g["params"], g["param_names"]))
    recorded = getattr(manifest.training_state, "param_names", None) if manifest else None
    if not names and isinstance(recorded, list) and len(recorded) == count:
        ids = [p for g in groups for p in g.get("params", [])]
        names = dict(zip(ids, recorded))
    return names


def _check_rng(values: dict[str, Any], state: TrainingState, unsafe: set[str], findings: list[Any]) -> None:
    if state.rng and state.world_size and len(state.rng) != state.world_size:
        findings.append(Finding("rng_state_missing", "error", None,
                                f"{len(state.rng)} RNG file(s) for world_size {state.world_size}"))
    for rel in state.rng:
        if rel in unsafe or rel.endswith(".json") or rel.endswith("model_optim_rng.pt"):
            continue
        obj = _load(values, rel)
        if not isinstance(obj, dict):
            continue
        missing = [k for k in ("python", "numpy", "cpu") if k not in obj]
        if missing:
            findings.append(Finding("rng_state_missing", "error", rel, f"no {', '.join(missing)} generator state"))
