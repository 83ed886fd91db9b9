"""`auditor explain CODE` (issue 17 item 3): the status a code implies and its one line from auditor.explain."""

from __future__ import annotations

from click.testing import CliRunner
from test_contract_doc import emitted_codes

from auditor.cli import main
from auditor.explain import EXPLANATIONS


def test_explain_names_the_status_and_the_meaning():
    r = CliRunner().invoke(main, ["explain", "size_mismatch"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"size_mismatch (corrupt): {EXPLANATIONS['size_mismatch']}"
    r = CliRunner().invoke(main, ["explain", "no_probe"])
    assert r.exit_code == 0 and r.stdout.startswith("no_probe (warning or info"), r.output


def test_every_emitted_code_can_be_explained():
    assert sorted(emitted_codes() - set(EXPLANATIONS)) == []


def test_unknown_code_exits_2_with_near_matches():
    r = CliRunner().invoke(main, ["explain", "size_mismach"])
    assert r.exit_code == 2
    assert "unknown finding code 'size_mismach'" in r.stderr and "size_mismatch" in r.stderr
    assert CliRunner().invoke(main, ["explain"]).exit_code == 2


def test_list_prints_every_code():
    r = CliRunner().invoke(main, ["explain", "--list"])
    assert r.exit_code == 0
    assert [line.split(" ", 1)[0] for line in r.stdout.splitlines()] == sorted(EXPLANATIONS)
