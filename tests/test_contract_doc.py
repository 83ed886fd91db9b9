"""The repository carries its own contract: every finding code the code can emit is documented."""

from __future__ import annotations

import re
from pathlib import Path

from auditor.model import STATUS_OF_CODE, Assurance

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = (ROOT / "docs" / "contract.md").read_text(encoding="utf-8")
# Finding.error("code", …), FormatError("code", …), ZipRefused("code", …) and the like, as written in the source.
EMITTED = re.compile(r'(?:Finding(?:\.error|\.warning|\.info)?|FormatError|ZipRefused|Hazard)\(\s*"([a-z_]+)"')


def emitted_codes() -> set[str]:
    codes = set(STATUS_OF_CODE)
    for path in (ROOT / "auditor").rglob("*.py"):
        codes |= set(EMITTED.findall(path.read_text(encoding="utf-8")))
    return codes


def test_every_finding_code_is_documented():
    codes = emitted_codes()
    assert len(codes) > 40  # the scan found the codes, or it proves nothing
    undocumented = sorted(c for c in codes if f"`{c}`" not in CONTRACT)
    assert not undocumented, f"finding codes missing from docs/contract.md: {undocumented}"


def test_every_status_and_assurance_is_documented():
    for word in ("ok", "corrupt", "missing", "nonfinite", "drift", "incomplete", "unsafe", "untrusted", "unverifiable",
                 "pending", "error",
                 *(a.value for a in Assurance)):
        assert f"`{word}`" in CONTRACT, word


def test_readme_links_the_contract():
    assert "docs/contract.md" in (ROOT / "README.md").read_text(encoding="utf-8")
