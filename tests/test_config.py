from __future__ import annotations

from pathlib import Path

import pytest

from auditor.config import load_config, parse_duration
from auditor.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "config.example.yaml"


def test_example_config_is_valid():
    cfg = load_config(str(EXAMPLE), env={})
    assert cfg.prefixes and cfg.server.listen == "0.0.0.0:9180"
    kinds = {p.url.split("://")[0] for p in cfg.prefixes}
    assert {"s3", "gs", "webhdfs"} <= kinds


@pytest.mark.parametrize("text,seconds", [("90", 90), ("30s", 30), ("10m", 600), ("1h", 3600), ("7d", 604800), (5, 5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_environment_overrides_every_section(tmp_path):
    cfg = load_config(None, env={"AUDITOR_SERVER__LISTEN": "127.0.0.1:1", "AUDITOR_SCAN__JOBS": "7",
                                 "AUDITOR_SCAN__DEEP_INTERVAL": "3d", "AUDITOR_STATE__URL": "sqlite:///x.db"})
    assert cfg.server.listen == "127.0.0.1:1" and cfg.scan.jobs == 7
    assert cfg.scan.deep_interval == 3 * 86400 and cfg.state.url == "sqlite:///x.db"


@pytest.mark.parametrize("text,key", [
    ("scan:\n  jobs: 0\n", "scan.jobs"),
    ("scan:\n  deep_interval: soon\n", "scan.deep_interval"),
    ("server:\n  lisen: x\n", "server.lisen"),
    ("prefixes:\n  - storage_options: {}\n", "prefixes.0.url"),
])
def test_invalid_key_is_named(tmp_path, text, key):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(str(p), env={})


def test_per_prefix_overrides_merge(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("scan: {jobs: 2}\nprefixes:\n  - url: memory://a\n    scan: {deep_interval: 3d}\n")
    cfg = load_config(str(p), env={})
    merged = cfg.scan_for(cfg.prefixes[0])
    assert merged.deep_interval == 3 * 86400 and merged.jobs == 2 and merged.shallow_interval == 3600
