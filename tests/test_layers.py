"""The module table of docs/DESIGN.md is the code's: every import of every module (deferred
ones too) is one the table allows, and no import circle exists (`.ci/imports.py` computes
both); the commands that only look load none of the daemon."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_checker():
    spec = importlib.util.spec_from_file_location("imports_check", os.path.join(ROOT, ".ci", "imports.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checker = load_checker()


def test_every_import_is_one_the_design_table_allows_and_none_forms_a_circle():
    edges = checker.graph()
    assert checker.circles(edges) == []
    assert checker.violations(edges, checker.table()) == []


def test_the_checker_finds_circles_and_imports_the_table_does_not_allow():
    edges = {"a": {"b", "trio"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert checker.circles(edges) == [["a", "b", "c"]]
    rules = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "e": set()}
    assert checker.violations(edges, rules) == [
        "a imports trio: not allowed by docs/DESIGN.md",
        "d: not in docs/DESIGN.md's module table",
        "e: in docs/DESIGN.md's module table, but no such module",
    ]
    assert checker.table()["options"] == set() and "lmdb" in checker.table()["journal"]


def test_commands_that_only_look_load_none_of_the_daemon():
    code = (
        "import sys; from shufflefs import cli, control, bench, places; cli.build_parser(); "
        "print(sorted(m for m in ('shufflefs.daemon', 'shufflefs.core', 'lmdb', 'pyfuse3') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
