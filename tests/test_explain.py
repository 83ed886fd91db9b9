"""`auditor explain CODE`: every finding code the source emits has its one line, the same as the contract's."""

from __future__ import annotations

import re

from click.testing import CliRunner
from test_contract_doc import CONTRACT, emitted_codes

from auditor.cli import main
from auditor.explain import EXPLANATIONS, explain
from auditor.model import STATUS_OF_CODE

ROWS = {code: text.strip().replace("`", "")
        for code, _, text in re.findall(r"^\| `([a-z_]+)` \| ([^|]*) \| (.*) \|$", CONTRACT, re.M)}


def test_every_emitted_code_is_explained_as_the_contract_says():
    codes = emitted_codes()
    assert set(STATUS_OF_CODE) <= codes and len(codes) > 40
    assert sorted(codes - set(EXPLANATIONS)) == []
    differs = {c: (EXPLANATIONS[c], ROWS.get(c)) for c in EXPLANATIONS if EXPLANATIONS[c] != ROWS.get(c)}
    assert not differs, differs


def test_explain_names_the_status_and_the_meaning():
    r = CliRunner().invoke(main, ["explain", "size_mismatch"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("size_mismatch (corrupt): ") and "size" in r.stdout
    assert explain("no_probe").startswith("no_probe (warning or info")


def test_unknown_code_exits_2_with_near_matches():
    r = CliRunner().invoke(main, ["explain", "size_mismach"])
    assert r.exit_code == 2
    assert "unknown finding code 'size_mismach'" in r.stderr and "size_mismatch" in r.stderr
    assert CliRunner().invoke(main, ["explain"]).exit_code == 2


def test_list_prints_every_code():
    r = CliRunner().invoke(main, ["explain", "--list"])
    assert r.exit_code == 0
    assert [line.split(" ", 1)[0] for line in r.stdout.splitlines()] == sorted(EXPLANATIONS)
