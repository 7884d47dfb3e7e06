"""One home for each rule's code: the server's own layers (API, portal, workflows, store) name a
registry code or rule ID only through `dr.rules`, never as a string literal of their own.

(The fabrics and the data plane sit below `dr` and cannot import the registry: a provider's own
`FabricError` code is translated by the checks, so they are not scanned.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import siterecovery
from siterecovery.dr.rules import PS_DISCONNECTED, RULES

SRC = Path(siterecovery.__file__).resolve().parent
SCANNED = ("control", "dr", "portal", "server", "store")


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def spelled_again(root: Path) -> list[str]:
    """`file:line: literal` for every string literal that is a registry code or rule ID."""
    names = {rule.code for rule in RULES.values()} | {rule.id for rule in RULES.values()}
    found = []
    for package in SCANNED:
        for path in sorted((root / package).rglob("*.py")):
            if path == root / "dr" / "rules.py":
                continue
            found += [
                f"{path.relative_to(root)}:{line}: {value!r}"
                for line, value in _literals(path)
                if value in names
            ]
    return found


def test_no_registry_code_or_rule_id_is_spelled_outside_the_registry() -> None:
    assert spelled_again(SRC) == []


def test_the_scan_finds_a_code_spelled_again(tmp_path: Path) -> None:
    # The scan itself can fail: a module that spells a registry code is reported with its line.
    code = next(iter(RULES))
    for package in SCANNED:
        (tmp_path / package).mkdir()
    (tmp_path / "dr" / "rules.py").write_text(f"CODE = {code!r}\n")  # the registry's own copy
    (tmp_path / "control" / "api.py").write_text(f'"""Docstring naming {code}."""\nX = 1\nY = {code!r}\n')
    assert spelled_again(tmp_path) == [f"control/api.py:3: {code!r}"]


def test_a_refusal_keeps_the_rules_code_and_id_with_its_own_remediation() -> None:
    p = PS_DISCONNECTED.refusal("No process server 'ps9' is registered.", "Start it.")
    assert (p.code, p.rule, p.message, p.remediation) == (
        "ps-disconnected",
        "RP-PS",
        "No process server 'ps9' is registered.",
        "Start it.",
    )
