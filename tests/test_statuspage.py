"""The daemon's status page (`GET /`, issue 17): rendered by a real daemon, read by a real headless Chromium.

Also the papercuts beside it: `/api/v1/checkpoints?prefix=<sub-folder>` returns only that folder's
checkpoints, and rows are ordered by run and step as numbers (API, CLI table, page), not as text.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import fsspec
import pytest
import requests
import yaml
from ckpts import flip_bit, tensor_offset, write_hf_checkpoint, write_run
from click.testing import CliRunner
from daemon import DaemonProcess, seal_run
from prometheus_client import CollectorRegistry

from auditor.cli import main
from auditor.config import Config
from auditor.daemon import Daemon
from auditor.explain import EXPLANATIONS
from auditor.http import Server
from auditor.model import checkpoint_order, natural_key
from auditor.statuspage import MAX_FLAGGED, MAX_OTHERS, render

pytestmark = pytest.mark.timeout(300)

CHROMIUM = shutil.which("chromium-headless-shell") or shutil.which("chromium")
HOSTILE = "<script>document.title='pwned'"  # a folder name: no slash, so no closing tag
PHONE = (412, 915)


# ------------------------------------------------------------------ helpers

class Cards(HTMLParser):
    """The page's checkpoint cards in order: (class attribute, text), and every start tag seen."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.cards: list[tuple[str, str]] = []
        self.tags: list[str] = []
        self._depth = 0
        self._text: list[str] = []
        self._cls = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "article":
            self._depth, self._text, self._cls = 1, [], dict(attrs).get("class") or ""
        elif self._depth:
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "article" and self._depth:
            self.cards.append((self._cls, " ".join("".join(self._text).split())))
            self._depth = 0

    def handle_data(self, data: str) -> None:
        if self._depth:
            self._text.append(data)


def cards(page: str) -> Cards:
    parser = Cards()
    parser.feed(page)
    return parser


def words(code: str) -> str:
    return EXPLANATIONS[code].replace("`", "")


def chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses to run as root with it
    return subprocess.run([CHROMIUM, "--headless", *sandbox, "--disable-gpu", "--no-first-run",
                           "--hide-scrollbars", f"--user-data-dir={tmp / 'chromium-profile'}",
                           f"--window-size={PHONE[0]},{PHONE[1]}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def png_size_and_colours(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the decoded pixel rows) of a PNG: a blank image has few."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def damage(ck: Path) -> None:
    weights = str(ck / "model.safetensors")
    flip_bit(fsspec.filesystem("file"), weights, offset=tensor_offset(weights, "head.bias"))


def config(state: Path, prefixes: list[dict[str, Any]]) -> Config:
    return Config.model_validate({"state": {"url": f"sqlite:///{state}"},
                                  "scan": {"settle_time": "0s", "jobs": 2, "jitter": 0.0}, "prefixes": prefixes})


@contextmanager
def running(cfg: Config) -> Iterator[tuple[Daemon, str]]:
    """A Daemon (no scheduler: the test runs each pass) and its HTTP server on a free loopback port."""
    daemon = Daemon(cfg, CollectorRegistry())
    server = Server(daemon, "127.0.0.1:0", token="")
    server.start()
    try:
        yield daemon, f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        daemon.shutdown(grace=5)


def get(url: str, **kw: Any) -> requests.Response:
    return requests.get(url, timeout=10, **kw)


# ------------------------------------------------------------------ the page in a real browser

def test_status_page_in_headless_chromium(tmp_path, daemons):
    if CHROMIUM is None:
        missing = "no Chromium (Debian chromium-headless-shell or chromium): scripts/install-system-deps.sh installs it"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the status page in a browser: {missing}")  # as conftest does for PostgreSQL
        pytest.skip(missing)
    prefix = tmp_path / "prefix"
    seal_run(prefix / "run-a", [5, 10, 100])
    damage(prefix / "run-a" / "checkpoint-10")
    write_hf_checkpoint(prefix / "run-b" / HOSTILE, step=7)
    d = DaemonProcess(tmp_path, [{"url": str(prefix)}]).start()
    daemons.append(d)

    def judged() -> bool:
        rows = d.get("/api/v1/checkpoints").json()["checkpoints"]
        return len(rows) == 4 and all(r["last_verified"] and r["status"] != "pending" for r in rows) \
            and any(r["status"] == "corrupt" for r in rows)

    d.wait(judged, 120, "verdicts of all four checkpoints")
    served = d.get("/")
    assert served.status_code == 200 and served.headers["Content-Type"].startswith("text/html")

    dumped = chromium(tmp_path, "--dump-dom", d.url + "/")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    page = cards(dumped.stdout)
    assert page.cards, dumped.stdout[:2000]
    first_class, first_text = page.cards[0]
    # The damaged checkpoint comes first, marked failing, with its findings in words.
    assert "failing" in first_class and "corrupt" in first_text.lower(), page.cards[0]
    assert str(prefix / "run-a" / "checkpoint-10") in first_text
    assert words("digest_mismatch") in first_text and "digest_mismatch" in first_text
    # The rest by run, then step as a number: 5 before 100 (as text, "100" < "5").
    order = [text for _, text in page.cards[1:]]
    at = {name: next(i for i, t in enumerate(order) if name in t) for name in ("checkpoint-5 ", "checkpoint-100 ")}
    assert at["checkpoint-5 "] < at["checkpoint-100 "], order
    # The hostile folder name is text on the page, not markup: Chromium built no script element from it.
    assert "script" not in page.tags, page.tags
    assert any(HOSTILE in text for text in order), order
    assert "pwned" not in dumped.stdout.split("<title>", 1)[1].split("</title>", 1)[0]

    shot = tmp_path / "status.png"
    taken = chromium(tmp_path, f"--screenshot={shot}", d.url + "/")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    width, height, colours = png_size_and_colours(shot)
    assert (width, height) == PHONE
    assert shot.stat().st_size > 5000 and colours > 20, (shot.stat().st_size, colours)  # text drawn, not blank


# ------------------------------------------------------------------ the page and the API over HTTP, in-process

def test_page_is_read_only_and_locked_down(tmp_path):
    prefix = tmp_path / "prefix"
    seal_run(prefix / "run", [1])
    with running(config(tmp_path / "state.db", [{"url": str(prefix)}])) as (daemon, base):
        daemon.tick(str(prefix))
        r = get(base + "/")
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp and "unsafe-inline" not in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in r.text
        # Nothing on the page triggers work, so it needs no auth: no forms, no scripts, no external assets.
        assert "<form" not in r.text and "<script" not in r.text and "http://" not in r.text.split("<body>")[1]
        assert daemon.jobs == {}
        assert 'href="/api/v1/checkpoints?prefix=' in r.text and "docs/runbook.md" in r.text
        missing = get(base + "/", params={"prefix": "/elsewhere/<b>"})
        assert missing.status_code == 404 and "&lt;b&gt;" in missing.text and "<b>" not in missing.text


def test_subfolder_prefix_returns_only_that_folder(tmp_path):
    prefix = tmp_path / "prefix"
    write_run(prefix / "run-a", [1, 2])
    write_run(prefix / "run-ab", [1])  # a sibling whose name starts like run-a: not under run-a
    write_run(prefix / "run-b", [1])
    key = str(prefix)
    with running(config(tmp_path / "state.db", [{"url": key}])) as (daemon, base):
        daemon.tick(key)

        def urls(asked: str) -> list[str]:
            r = get(base + "/api/v1/checkpoints", params={"prefix": asked})
            assert r.status_code == 200, r.text
            assert r.json()["prefix"] == key  # the configured prefix that holds it
            assert r.json().get("under") == (None if asked == key else asked)
            return [c["url"] for c in r.json()["checkpoints"]]

        assert len(urls(key)) == 4
        assert urls(f"{key}/run-a") == [f"{key}/run-a/checkpoint-1", f"{key}/run-a/checkpoint-2"]
        assert urls(f"{key}/run-a/") == [f"{key}/run-a/checkpoint-1", f"{key}/run-a/checkpoint-2"]
        assert urls(f"{key}/run-b/checkpoint-1") == [f"{key}/run-b/checkpoint-1"]
        assert get(base + "/api/v1/checkpoints", params={"prefix": f"{key}/../x"}).status_code == 404
        page = get(base + "/", params={"prefix": f"{key}/run-a"}).text
        texts = [t for _, t in cards(page).cards]
        assert len(texts) == 2 and all("/run-a/" in t for t in texts), texts


def test_rows_sort_by_run_and_step_as_numbers(tmp_path):
    prefix = tmp_path / "prefix"
    write_run(prefix / "run-10", [5])
    write_run(prefix / "run-2", [100, 5, 10])
    key = str(prefix)
    want = [f"{key}/run-2/checkpoint-5", f"{key}/run-2/checkpoint-10", f"{key}/run-2/checkpoint-100",
            f"{key}/run-10/checkpoint-5"]
    with running(config(tmp_path / "state.db", [{"url": key}])) as (daemon, base):
        daemon.tick(key)
        api = [c["url"] for c in get(base + "/api/v1/checkpoints", params={"prefix": key}).json()["checkpoints"]]
        assert api == want
        assert [c["url"] for c in get(base + "/api/v1/checkpoints").json()["checkpoints"]] == want
        page = [t for _, t in cards(get(base + "/").text).cards]
        assert [next(u for u in want if u + " " in t + " ") for t in page] == want, page
    table = CliRunner().invoke(main, ["rescan", "--prefix", key])
    assert table.exit_code == 0, table.output
    rows = [w for line in table.output.splitlines() for w in line.split() if w.startswith(f"{key}/")]
    assert rows == want, table.output
    as_json = CliRunner().invoke(main, ["rescan", "--prefix", key, "--json"])
    assert [v["url"] for v in json.loads(as_json.stdout)["checkpoints"]] == want


# ------------------------------------------------------------------ the renderer alone

def _row(i: int, status: str, **kw: Any) -> dict[str, Any]:
    findings = [{"code": "digest_mismatch", "severity": "error", "file": "model.safetensors",
                 "detail": "sha256 differs " + "x" * 1000}] if status == "corrupt" else []
    return {"prefix": "s3://b/p", "url": f"s3://b/p/run/checkpoint-{i}", "run": "run", "step": i,
            "layout": "hf-trainer", "status": status, "assurance": "sealed", "sealed": True,
            "last_verified": 1_700_000_000.0, "tiers": {"content": status}, "findings": findings, **kw}


STATUS_DOC = {"prefixes": [{"prefix": "s3://b/p", "counts": {}, "failures": 0, "last_success": 1_700_000_000.0,
                            "scan_up": 1.0}], "ready": True, "uptime_seconds": 60.0}


def test_ten_thousand_checkpoints_make_a_bounded_page():
    failing = MAX_FLAGGED + 100
    rows = [_row(i, "corrupt" if i % 33 == 0 and i // 33 < failing else "ok") for i in range(10_000)]
    page = render(STATUS_DOC, rows, now=1_700_000_060.0)
    assert len(page.encode()) < 600_000, len(page.encode())
    found = cards(page).cards
    assert len(found) == MAX_FLAGGED + MAX_OTHERS
    assert all("failing" in cls for cls, _ in found[:MAX_FLAGGED])
    assert "… and 100 more failing or suspect checkpoint(s)" in page
    assert f"… and {10_000 - failing - MAX_OTHERS} more checkpoint(s) that are ok or pending" in page
    assert "checkpoint-0 " in found[0][1] and "checkpoint-33 " in found[1][1]  # failing, in step order


def test_storage_text_is_escaped():
    hostile = _row(1, "corrupt", url="s3://b/p/run/<script>alert(1)</script>", run="<b>run</b>",
                   findings=[{"code": "unsafe_pickle", "severity": "error", "file": '"><img src=x onerror=alert(1)>',
                              "detail": "</li><script>alert(2)</script>"},
                             {"code": "<i>made-up</i>", "severity": "warning", "file": None, "detail": "&amp;"}])
    page = render(STATUS_DOC, [hostile], now=1_700_000_060.0)
    parsed = cards(page)
    assert not {"script", "img", "i"} & set(parsed.tags), parsed.tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;run&lt;/b&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page and "&amp;amp;" in page
    (cls, text), = parsed.cards
    assert "failing" in cls and words("unsafe_pickle") in text
    assert "no explanation" in text  # an unknown code from an older or newer auditor still renders


# ------------------------------------------------------------------ Grafana and the alerts link to the page

ROOT = Path(__file__).resolve().parents[1]


def test_grafana_dashboard_links_to_the_status_page():
    dash = json.loads((ROOT / "grafana" / "dashboards" / "ckpt-auditor.json").read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["auditor"]["type"] == "textbox" and variables["auditor"]["query"].startswith("http")
    assert any(link["url"] == "${auditor}/" for link in dash["links"]), dash["links"]
    panels = {p["id"]: p for p in dash["panels"]}
    per_prefix = panels[5]  # failing checkpoints per prefix: each series opens its prefix's page
    assert "ckpt_verify_failures" in per_prefix["targets"][0]["expr"]
    (link,) = per_prefix["fieldConfig"]["defaults"]["links"]
    assert link["url"] == "${auditor}/?prefix=${__field.labels.prefix:percentencode}"
    assert panels[1]["fieldConfig"]["defaults"]["links"][0]["url"] == "${auditor}/"


def test_failure_alerts_link_to_the_status_page():
    rules = {r["alert"]: r for g in yaml.safe_load((ROOT / "monitoring" / "alerts.yaml").read_text())["groups"]
             for r in g["rules"]}
    link = rules["CheckpointVerifyFailures"]["annotations"]["status_page"]
    # promtool renders it in monitoring/alerts_test.yaml (tests/test_deploy.py runs that).
    assert link == "http://{{ $labels.instance }}/?prefix={{ $labels.prefix | urlquery }}"
    rendered = (ROOT / "monitoring" / "alerts_test.yaml").read_text()
    assert "status_page: http://10.0.0.1:9180/?prefix=s3%3A%2F%2Fml-ckpts%2Fllm%2F" in rendered
    grafana = yaml.safe_load((ROOT / "grafana" / "provisioning" / "alerting" / "ckpt-auditor.yaml").read_text())
    (rule,) = [r for g in grafana["groups"] for r in g["rules"] if r["uid"] == "ckpt-verify-failures"]
    assert "by (prefix, instance)" in rule["data"][0]["model"]["expr"]
    assert "http://{{ $labels.instance }}/?prefix={{ $labels.prefix | urlquery }}" in rule["annotations"]["status_page"]


def test_natural_order_of_names():
    names = ["step-10", "step-5", "step-007", "run", "step-" + "9" * 5000, "step-100", "a2b10", "a2b9", "step-"]
    assert sorted(names, key=natural_key) == ["a2b9", "a2b10", "run", "step-", "step-5", "step-007", "step-10",
                                              "step-100", "step-" + "9" * 5000]
    order = sorted([("run-10", 5, "u3"), ("run-2", None, "u2"), ("run-2", 10, "u1"), ("run-2", 9, "u0")],
                   key=lambda r: checkpoint_order(*r))
    assert order == [("run-2", None, "u2"), ("run-2", 9, "u0"), ("run-2", 10, "u1"), ("run-10", 5, "u3")]
