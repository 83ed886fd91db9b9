"""Issue 17 item 3: the repository's contract lists every metric the daemon exports and every config key."""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator

import pydantic
from test_contract_doc import CONTRACT, ROOT

from auditor import config


def _keys(model: type[pydantic.BaseModel], prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = [t for t in (field.annotation, *typing.get_args(field.annotation))
                  if isinstance(t, type) and issubclass(t, pydantic.BaseModel)]
        listed = [t for a in typing.get_args(field.annotation) for t in (a,)
                  if isinstance(t, type) and issubclass(t, pydantic.BaseModel)]
        if not nested:
            yield key
        for t in nested:
            sub = f"{key}[]." if listed and typing.get_origin(field.annotation) is list else f"{key}."
            yield from _keys(t, sub)


def test_every_metric_is_in_the_contract():
    source = (ROOT / "auditor" / "metrics.py").read_text(encoding="utf-8")
    # As exposed: prometheus_client adds _total to a Counter's name and _info to an Info's.
    suffix = {"Counter": "_total", "Info": "_info", "Gauge": ""}
    names = {name + suffix[kind] for kind, name in re.findall(r'\b(Counter|Gauge|Info)\(\s*"(ckpt_[a-z_]+)"', source)}
    assert len(names) > 8, names
    assert sorted(n for n in names if f"`{n}`" not in CONTRACT) == []


def test_every_config_key_is_in_the_contract():
    keys = [k for k in _keys(config.Config) if not k.startswith("prefixes[].scan.")]  # per-prefix scan: scan.*
    assert "scan.read.part_size" in keys and "state.url" in keys, keys
    assert sorted(k for k in keys if f"`{k}`" not in CONTRACT) == []
