"""The daemon's status page (`GET /`): one server-rendered HTML page, failing and suspect checkpoints first.

Pure rendering over what the HTTP API already serves (the /api/v1/status document and the
/api/v1/checkpoints rows): no storage, no database, no scripts, no external assets. Everything that
came from storage (URLs, file names, finding details) is HTML-escaped here, and the Content-Security-Policy
the handler sends with the page forbids scripts even if an escape were ever missed.
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from auditor.explain import EXPLANATIONS
from auditor.model import FAILURES, Severity, Status, checkpoint_order

RUNBOOK_URL = "https://github.com/ckpt-auditor/ckpt-auditor/blob/main/docs/runbook.md"
# Rows rendered per prefix: every failing or suspect checkpoint up to MAX_FLAGGED, then at most
# MAX_OTHERS of the rest; the page names how many it left out, so 10,000 checkpoints stay one small page.
MAX_FLAGGED = 200
MAX_OTHERS = 50
# Findings shown per checkpoint, and characters of a finding's detail (details can quote long file lists).
MAX_FINDINGS = 5
MAX_DETAIL = 300
REFRESH_SECONDS = 60

# Rank on the page: lower first.
FAILING, SUSPECT, PENDING, FINE = range(4)
_SUSPECT_STATUSES = frozenset({Status.ERROR, Status.UNVERIFIABLE})
_RANK_WORDS = {FAILING: "failing", SUSPECT: "suspect", PENDING: "pending", FINE: "ok"}

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:60rem;
padding:0.75rem;line-height:1.4;color:#1b1b1b;background:#fafafa}
h1{font-size:1.3rem;margin:0.2rem 0}h2{font-size:1.1rem;margin:1.2rem 0 0.3rem;word-break:break-all}
nav a,.links a{margin-right:0.8rem}
.ck{background:#fff;border:1px solid #ddd;border-left:0.4rem solid #9e9e9e;border-radius:4px;
margin:0.5rem 0;padding:0.5rem 0.7rem}
.ck.failing{border-left-color:#c62828}.ck.suspect{border-left-color:#ef6c00}.ck.ok{border-left-color:#2e7d32}
.url{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.status{font-weight:bold;text-transform:uppercase}.failing .status{color:#c62828}.suspect .status{color:#ef6c00}
.meta{color:#555;font-size:0.9rem}ul{margin:0.3rem 0;padding-left:1.2rem}li{overflow-wrap:anywhere}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:0.9em;word-break:break-all}
.more{color:#555;font-style:italic}.down{color:#c62828;font-weight:bold}
"""
# The page's only style, allowed by its hash: the policy needs no 'unsafe-inline'.
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; img-src 'none'; "
                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class PageScope:
    """What the page shows: every configured prefix, or one (`prefix`), optionally only a folder under it."""

    prefix: str | None = None
    under: str | None = None


def rank(ck: dict[str, Any]) -> int:
    """Failing, suspect (could not be proven, or carries a warning), pending, or fine."""
    status = ck.get("status")
    if status in FAILURES:
        return FAILING
    if status in _SUSPECT_STATUSES:
        return SUSPECT
    if any(f.get("severity") != Severity.INFO for f in _findings(ck)):
        return SUSPECT
    if status == Status.PENDING:
        return PENDING
    return FINE


PageKey = tuple[int, tuple[object, ...]]


def page_order(ck: dict[str, Any]) -> PageKey:
    """Failing first, then suspect, pending, fine; within each, by run and numeric step."""
    return rank(ck), checkpoint_order(str(ck.get("run") or "."), _step(ck), str(ck.get("url") or ""))


def under_folder(checkpoints: Iterable[dict[str, Any]], folder: str) -> list[dict[str, Any]]:
    """The checkpoints at or below `folder` (a URL spelled like the checkpoints' own)."""
    base = folder.rstrip("/")
    return [ck for ck in checkpoints if ck.get("url") == base or str(ck.get("url", "")).startswith(base + "/")]


def render(status: dict[str, Any], checkpoints: list[dict[str, Any]], scope: PageScope = PageScope(),
           now: float | None = None) -> str:
    """The whole page: `status` is the /api/v1/status document, `checkpoints` the /api/v1/checkpoints rows."""
    now = time.time() if now is None else now
    prefixes = [p for p in status.get("prefixes", []) if scope.prefix is None or p.get("prefix") == scope.prefix]
    rows = under_folder(checkpoints, scope.under) if scope.under else checkpoints
    by_prefix: dict[str, list[tuple[PageKey, dict[str, Any]]]] = {}
    failing = 0
    for ck in rows:
        key = page_order(ck)  # computed once per row: 10,000 rows are sorted on every request
        failing += key[0] == FAILING
        by_prefix.setdefault(str(ck.get("prefix")), []).append((key, ck))
    title = f"{failing} failing checkpoint(s)" if failing else "no failing checkpoints"
    parts = [_head(title), "<body>", "<header>", "<h1>ckpt-auditor: " + _e(title) + "</h1>",
             _daemon_line(status, now), _nav(scope), "</header>", "<main>"]
    if not prefixes:
        parts.append("<p>No prefix is configured.</p>")
    for p in prefixes:
        parts.append(_prefix_section(p, by_prefix.get(str(p.get("prefix")), []), scope, now))
    parts += ["</main>", _footer(), "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def not_found(message: str) -> str:
    """A small page for a prefix the daemon does not watch."""
    return "\n".join([_head("not found"), "<body><main><h1>Not found</h1>", f"<p>{_e(message)}</p>",
                      '<p><a href="/">All prefixes</a></p></main></body></html>']) + "\n"


# ------------------------------------------------------------------ pieces

def _head(title: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">\n'
            f"<title>ckpt-auditor: {_e(title)}</title>\n<style>{STYLE}</style>\n</head>")


def _daemon_line(status: dict[str, Any], now: float) -> str:
    ready = "ready" if status.get("ready") else "not ready (starting or stopping)"
    uptime = status.get("uptime_seconds")
    up = f", up {_duration(float(uptime))}" if isinstance(uptime, (int, float)) else ""
    return (f'<p class="meta">Daemon {ready}{up}; page rendered {_e(_when(now))}, '
            f"refreshed every {REFRESH_SECONDS} s.</p>")


def _nav(scope: PageScope) -> str:
    links = ['<a href="/">All prefixes</a>'] if scope.prefix else []
    links += ['<a href="/api/v1/status">/api/v1/status</a>', '<a href="/api/v1/checkpoints">/api/v1/checkpoints</a>',
              '<a href="/metrics">/metrics</a>', f'<a href="{_e(RUNBOOK_URL)}">Runbook</a>']
    return "<nav>" + " ".join(links) + "</nav>"


def _group(title: str, rows: list[tuple[int, dict[str, Any]]], cap: int, what: str, api: str,
           now: float) -> list[str]:
    """One group of checkpoints, at most `cap` of them, then how many more the JSON has."""
    if not rows:
        return []
    out = [f"<h3>{title} ({len(rows)})</h3>"] + [_checkpoint(ck, r, now) for r, ck in rows[:cap]]
    if len(rows) > cap:
        out.append(f'<p class="more">… and {len(rows) - cap} more {what}: see <a href="{_e(api)}">the JSON</a>.</p>')
    return out


def _prefix_section(p: dict[str, Any], keyed: list[tuple[PageKey, dict[str, Any]]], scope: PageScope,
                    now: float) -> str:
    url = str(p.get("prefix"))
    shown_url = scope.under if scope.under and scope.prefix == url else url
    api = "/api/v1/checkpoints?prefix=" + quote(shown_url, safe="")
    ranked = sorted(keyed, key=lambda pair: pair[0])
    flagged = [(key[0], ck) for key, ck in ranked if key[0] in (FAILING, SUSPECT)]
    others = [(key[0], ck) for key, ck in ranked if key[0] not in (FAILING, SUSPECT)]
    out = [f'<section><h2><a href="/?prefix={_e(quote(url, safe=""))}" class="url">{_e(shown_url)}</a></h2>',
           _prefix_meta(p, len(keyed), shown_url != url, now),
           f'<p class="links"><a href="{_e(api)}">JSON</a>'
           f' <a href="{_e(RUNBOOK_URL)}#checkpointverifyfailures">Runbook: failing checkpoints</a></p>']
    if not keyed:
        out.append("<p>No checkpoints known here yet.</p>")
    out += _group("Failing or suspect", flagged, MAX_FLAGGED, "failing or suspect checkpoint(s)", api, now)
    out += _group("The others", others, MAX_OTHERS, "checkpoint(s) that are ok or pending", api, now)
    out.append("</section>")
    return "\n".join(out)


def _prefix_meta(p: dict[str, Any], known: int, folder: bool, now: float) -> str:
    counts = p.get("counts") or {}
    words = ", ".join(f"{int(n)} {_e(s)}" for s, n in sorted(counts.items())) or "nothing checked yet"
    last = p.get("last_success")
    scanned = f"last complete scan {_e(_ago(float(last), now))}" if isinstance(last, (int, float)) and last \
        else "no complete scan yet"
    here = f"{known} checkpoint(s) under this folder; the whole prefix: " if folder else ""
    line = f'<p class="meta">{here}{words}; {scanned}.'
    if p.get("scan_up") == 0 and last:
        line += (' <span class="down">The last pass could not list this prefix</span> '
                 f'(<a href="{_e(RUNBOOK_URL)}#checkpointprefixunreachable">runbook</a>).')
    return line + "</p>"


def _checkpoint(ck: dict[str, Any], r: int, now: float) -> str:
    status, assurance = str(ck.get("status")), str(ck.get("assurance") or "none")
    label = status if assurance == "none" else f"{status} ({assurance})"
    step = _step(ck)
    facts = [f"run {_e(str(ck.get('run') or '.'))}"]
    if step is not None:
        facts.append(f"step {step}")
    if ck.get("layout"):
        facts.append(_e(str(ck["layout"])))
    facts.append("sealed" if ck.get("sealed") else "not sealed")
    checked = ck.get("last_verified")
    facts.append(f"last checked {_e(_ago(float(checked), now))}" if isinstance(checked, (int, float)) and checked
                 else "not checked yet")
    out = [f'<article class="ck {_RANK_WORDS[r]}">', f'<div><span class="status">{_e(label)}</span> '
           f'<span class="url">{_e(str(ck.get("url")))}</span></div>', f'<div class="meta">{" · ".join(facts)}</div>']
    shown = [f for f in _findings(ck) if f.get("severity") != Severity.INFO]
    if shown:
        out.append("<ul>")
        out += [_finding(f) for f in shown[:MAX_FINDINGS]]
        if len(shown) > MAX_FINDINGS:
            out.append(f'<li class="more">and {len(shown) - MAX_FINDINGS} more finding(s) in the JSON</li>')
        out.append("</ul>")
    out.append("</article>")
    return "\n".join(out)


def _finding(f: dict[str, Any]) -> str:
    code = str(f.get("code"))
    words = EXPLANATIONS.get(code, "a finding this version of the auditor has no explanation for")
    detail = str(f.get("detail") or "")
    if len(detail) > MAX_DETAIL:
        detail = detail[:MAX_DETAIL] + "…"
    where = f" in <code>{_e(str(f['file']))}</code>" if f.get("file") else ""
    return (f"<li>{_e(words).replace('`', '')} <span class=\"meta\">(<code>{_e(code)}</code>{where}"
            f"{': ' + _e(detail) if detail else ''})</span></li>")


def _footer() -> str:
    return ('<footer class="meta"><p>Read-only: nothing on this page starts work. Rescans are '
            "<code>POST /api/v1/rescan</code> with the admin token (without one configured, from loopback only). "
            f'What each status and finding means: <a href="{_e(RUNBOOK_URL)}">the runbook</a>.</p></footer>')


# ------------------------------------------------------------------ helpers

def _findings(ck: dict[str, Any]) -> list[dict[str, Any]]:
    found = ck.get("findings")
    return [f for f in found if isinstance(f, dict)] if isinstance(found, list) else []


def _step(ck: dict[str, Any]) -> int | None:
    step = ck.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _ago(ts: float, now: float) -> str:
    return f"{_when(ts)} ({_duration(max(0.0, now - ts))} ago)"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
