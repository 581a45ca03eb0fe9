"""Pyflakes' rules (through ruff) over the project's Python: an import never used, a name used and never defined,
a name defined twice, a local assigned and never read, a file that does not parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES = "F401,F811,F821,F841,E9"


def test_no_unused_import_undefined_name_or_syntax_error():
    ruff = Path(sys.executable).parent / "ruff"
    proc = subprocess.run([str(ruff), "check", "--no-cache", "--select", RULES, "--output-format", "concise",
                           "src", "flows", "tests", "bench", "docs"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All checks passed" in proc.stdout


def test_the_check_finds_what_it_looks_for(tmp_path):
    """The same command over a file with an unused import and an undefined name fails and names both."""
    (tmp_path / "bad.py").write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    ruff = Path(sys.executable).parent / "ruff"
    proc = subprocess.run([str(ruff), "check", "--no-cache", "--select", RULES, "--output-format", "concise", "bad.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "F401" in proc.stdout and "F821" in proc.stdout, proc.stdout
