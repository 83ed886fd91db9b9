"""Which model factories may run, and the built-in ones.

A manifest is data: it may *name* a factory, but only the operator decides what runs. Names are
compared as strings, never imported, so refusing a name costs nothing and runs nothing. The parent
decides (`FactoryPolicy.grant`, `operator_grant`); the child checks again before it imports
(`resolve_factory`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auditor import safejson
from auditor.errors import UsageError
from auditor.manifest import safe_join

ENTRY_POINT_GROUP = "ckpt_auditor.models"

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
_SPEC = re.compile(rf"({_DOTTED}):({_DOTTED})")
_PATTERN = re.compile(rf"({_DOTTED}):(\*|{_DOTTED})")
# Entry-point names as packaging writes them; no dots at either end, no "..", no whitespace.
_EP_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?=[A-Za-z0-9_-]))*")
_WILDCARD_ATTR = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # what MODULE:* matches: one public name
_AUTO_CLASS = re.compile(r"AutoModel[A-Za-z]*")
_SHOWN = 120  # characters of a manifest-supplied name quoted in a finding


class ProbeError(RuntimeError):
    """The probe could not run: the child crashed, hit a limit, or the factory is unusable."""


class FactoryNotAllowed(ProbeError):
    """The factory is not allowed by the operator, or not spelled as one can be."""


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "…")


def parse_factory_spec(spec: str) -> tuple[str, str]:
    """Split `module:callable` into its parts; ValueError for any other spelling (spaces, dots, `..`)."""
    if not isinstance(spec, str):
        raise ValueError(f"factory {spec!r} is not a string")
    m = _SPEC.fullmatch(spec)
    if not m:
        raise ValueError(f"factory {_shown(spec)} is not spelled MODULE:CALLABLE "
                         "(dotted Python identifiers, no whitespace, no leading or doubled dots)")
    return m.group(1), m.group(2)


def parse_allow_pattern(pattern: str) -> str:
    """Validate one allow-list entry, `MODULE:CALLABLE` or `MODULE:*`; return it unchanged or raise ValueError."""
    if not isinstance(pattern, str) or not _PATTERN.fullmatch(pattern):
        raise ValueError(f"allowed factory {pattern!r} is not MODULE:CALLABLE or MODULE:* "
                         "(dotted Python identifiers, no whitespace, no leading or doubled dots; "
                         "entry points need no entry, they are allowed by being installed)")
    return pattern


def installed_factories() -> dict[str, str]:
    """Entry-point name → `module:attr` of every installed `ckpt_auditor.models` entry (metadata only)."""
    out: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        # The first distribution wins, as `ep.load()` on a by-name lookup always did.
        out.setdefault(ep.name, f"{ep.module}:{ep.attr}")
    return out


def _allowed_by(target: str, allowed: Sequence[str]) -> str | None:
    """Return the allow-list entry that allows `target` (a valid `module:callable`), else None."""
    module, attr = target.split(":", 1)
    for pattern in allowed:
        p_module, _, p_attr = pattern.partition(":")
        if p_module != module:
            continue
        if p_attr == attr or (p_attr == "*" and _WILDCARD_ATTR.fullmatch(attr)):
            return pattern
    return None


@dataclass(frozen=True)
class FactoryGrant:
    """A factory the operator allowed: what to import, and the allow-list the child re-checks it against."""

    spec: str  # as named (manifest or operator): `module:callable` or an entry-point name
    target: str  # `module:callable` the child imports
    allowed: tuple[str, ...]  # handed to the child, which refuses `target` unless it matches


@dataclass(frozen=True)
class FactoryPolicy:
    """The operator's allow-list (`scan.allow_factories`, `--allow-factory`) plus installed entry points."""

    allowed: tuple[str, ...] = ()

    @classmethod
    def of(cls, *lists: Iterable[str] | None) -> FactoryPolicy:
        """Merge allow-lists, validating every entry (ValueError names the bad one)."""
        merged: list[str] = []
        for entries in lists:
            for entry in entries or ():
                if parse_allow_pattern(entry) not in merged:
                    merged.append(entry)
        return cls(tuple(merged))

    def grant(self, spec: str) -> FactoryGrant:
        """Allow `spec` or raise FactoryNotAllowed saying why and how to allow it; never imports."""
        if isinstance(spec, str) and ":" not in spec and _EP_NAME.fullmatch(spec):
            target = installed_factories().get(spec)
            if target is None:
                raise FactoryNotAllowed(
                    f"the probe factory {_shown(spec)} is not an installed {ENTRY_POINT_GROUP} entry point, so the "
                    f"probe was skipped; install the package that registers it, or record the factory as "
                    "MODULE:CALLABLE and allow it")
            return FactoryGrant(spec, target, (target,))
        try:
            parse_factory_spec(spec)
        except ValueError as e:
            raise FactoryNotAllowed(f"{e}; the probe was skipped and nothing was imported") from e
        if spec in installed_factories().values():
            return FactoryGrant(spec, spec, (spec,))  # the very callable an installed entry point names
        if _allowed_by(spec, self.allowed) is None:
            raise FactoryNotAllowed(
                f"the manifest names the probe factory {spec!r}, which the operator has not allowed, so the probe "
                f"was skipped (code named by a manifest never runs unless allowed). If you trust it, pass "
                f"`--allow-factory {spec}` to verify, rescan or latest; or add "
                f"it to `scan.allow_factories` in the config (per prefix too; or AUDITOR_SCAN__ALLOW_FACTORIES with a "
                f"config and in the daemon); "
                f"or install it as a `{ENTRY_POINT_GROUP}` entry point")
        return FactoryGrant(spec, spec, self.allowed)


def operator_grant(spec: str) -> FactoryGrant:
    """Allow the factory the operator typed (`seal --model`, `save_checkpoint(model_factory=...)`)."""
    if isinstance(spec, str) and ":" not in spec:
        installed = installed_factories()
        if spec not in installed:
            raise UsageError(f"--model {spec!r} is neither MODULE:CALLABLE nor an installed {ENTRY_POINT_GROUP} "
                             f"entry point (installed: {', '.join(sorted(installed)) or 'none'})")
        return FactoryGrant(spec, installed[spec], (installed[spec],))
    try:
        parse_factory_spec(spec)
    except ValueError as e:
        raise UsageError(f"--model: {e}") from e
    return FactoryGrant(spec, spec, (spec,))


def resolve_factory(target: str, allowed: Sequence[str]) -> Callable[..., Any]:
    """Child side: import `module:callable` only if `allowed` allows it (FactoryNotAllowed otherwise)."""
    try:
        module_name, attr = parse_factory_spec(target)
    except ValueError as e:
        raise FactoryNotAllowed(str(e)) from e
    pattern = _allowed_by(target, allowed)
    if pattern is None:
        raise FactoryNotAllowed(f"probe child refused factory {target!r}: not in the allow-list it was handed")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ProbeError(f"model factory {target!r} cannot be imported: {e}") from e
    # MODULE:* allows what MODULE defines, not what it imports: `from subprocess import run` in an
    # allowed module must not make MODULE:run a way to reach subprocess.
    if pattern.endswith(":*") and getattr(obj, "__module__", None) != module_name:
        raise FactoryNotAllowed(f"probe child refused factory {target!r}: {pattern} allows callables defined in "
                                f"{module_name}, and this one comes from {getattr(obj, '__module__', None)!r}")
    if not callable(obj) or inspect.ismodule(obj):
        raise ProbeError(f"model factory {target!r} is not callable")
    return obj


# ---------------------------------------------------------------- built-in factories


class CheckpointFiles:
    """Read-only view of the checkpoint's files, handed to factories that ask for `checkpoint`."""

    def __init__(self, root: str) -> None:
        self.root = root

    def read(self, relpath: str) -> bytes:
        return Path(safe_join(self.root, relpath)).read_bytes()

    def path(self, relpath: str) -> str:
        return safe_join(self.root, relpath)


def hf_from_config(checkpoint: CheckpointFiles, auto_class: str = "AutoModelForCausalLM", **overrides: Any) -> Any:
    """Build a transformers model from the checkpoint's own `config.json`, with random weights."""
    # Lazy: transformers (and the torch it imports) loads only in the probe child that builds this model.
    import transformers

    # The kwargs come from the manifest: they may pick an AutoModel* class, nothing else in transformers,
    # and never code shipped beside the weights (`auto_map`).
    if not _AUTO_CLASS.fullmatch(str(auto_class)) or not hasattr(transformers, auto_class):
        raise ProbeError(f"hf-auto: auto_class {auto_class!r} is not a transformers AutoModel* class")
    config = transformers.AutoConfig.for_model(**{**safejson.loads(checkpoint.read("config.json")), **overrides})
    return getattr(transformers, auto_class).from_config(config, trust_remote_code=False)
