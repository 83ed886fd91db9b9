"""auditor.explain: one line of words per finding code, in step with the code and with docs/contract.md."""

from __future__ import annotations

import re

import pytest
from test_contract_doc import CONTRACT, emitted_codes

from auditor.explain import EXPLANATIONS, explain
from auditor.model import STATUS_OF_CODE


def contract_finding_table() -> dict[str, str]:
    """code -> meaning, as docs/contract.md's finding table writes them."""
    section = CONTRACT.split("\n## Finding codes", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_]+)` \| [^|]* \| (.*) \|$", section, re.M)}


def test_every_code_has_an_explanation():
    codes = emitted_codes()
    assert len(codes) > 40  # the scan of the source found the codes, or it proves nothing
    assert set(STATUS_OF_CODE) <= codes
    missing = sorted(c for c in codes if not EXPLANATIONS.get(c, "").strip())
    assert not missing, f"finding codes without an explanation in auditor/explain.py: {missing}"


def test_explanations_are_one_line_each():
    for code, words in EXPLANATIONS.items():
        assert "\n" not in words and 10 < len(words) < 300, code


def test_contract_says_the_same():
    table = contract_finding_table()
    assert len(table) > 40
    assert sorted(set(EXPLANATIONS) ^ set(table)) == [], "explain.py and the contract list different codes"
    differ = sorted(c for c in table if table[c] != EXPLANATIONS[c])
    assert not differ, f"docs/contract.md and auditor/explain.py explain these codes differently: {differ}"


def test_explain():
    assert explain("digest_mismatch").startswith("a file's sha256/crc32c differ")
    with pytest.raises(KeyError, match="no_such_code"):
        explain("no_such_code")
