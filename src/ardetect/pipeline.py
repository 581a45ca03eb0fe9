"""Run the DVC stages in order, one at a time, and tell which ran and which were up to date.

Used by ``ard pipeline run`` (what ``make run`` calls) and by the Prefect flow, so
both drive the same ``dvc repro <stage>`` calls and DVC alone decides what is stale.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_RAN = re.compile(r"Running stage '([^']+)'")
_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
TRANSIENT = ("Unable to acquire lock", "database is locked", "Connection reset", "Temporary failure")


@dataclass
class StageOutcome:
    stage: str
    returncode: int
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def transient(self) -> bool:
        """A failure worth retrying (lock contention, a dropped connection), not a bad input."""
        return not self.ok and any(t in self.output for t in TRANSIENT)


def stages_in_order(root: Path) -> list[str]:
    """Stage names as ``dvc.yaml`` lists them (its order is the pipeline's order)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    return list(spec.get("stages", {}))


def dvc_executable() -> str:
    """The ``dvc`` beside the running interpreter (the project's venv), else the one on PATH."""
    candidate = Path(sys.executable).with_name("dvc")
    return str(candidate) if candidate.exists() else "dvc"


# glibc malloc kept from handing freed memory back to the OS between training steps:
# PyTorch on CPU otherwise re-faults its large buffers every step (measured: 10-15% of
# a phase-1 step on 2 cores). The Makefile exports the same values for the tests.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "17179869184", "MALLOC_TOP_PAD_": "1073741824"}


def repro_stage(stage: str, root: Path, echo: Callable[[str], None] | None = None, force: bool = False) -> StageOutcome:
    """``dvc repro <stage>`` (its upstream stages too, when stale); stream and parse its output."""
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # stage commands use the venv's python
    env.setdefault("GX_ANALYTICS_ENABLED", "False")
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    cmd = [dvc_executable(), "repro", stage] + (["--force", "--single-item"] if force else [])
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if echo is not None:
            echo(line.rstrip("\n"))
    rc = proc.wait()
    text = "".join(lines)
    return StageOutcome(stage, rc, ran=_RAN.findall(text), skipped=_SKIPPED.findall(text), output=text)


def summarize(outcomes: list[StageOutcome]) -> str:
    """A markdown table of what each step did."""
    rows = ["| stage | result | stages run | up to date |", "|---|---|---|---|"]
    for o in outcomes:
        result = "ok" if o.ok else f"FAILED (exit {o.returncode})"
        rows.append(f"| {o.stage} | {result} | {', '.join(o.ran) or '-'} | {', '.join(o.skipped) or '-'} |")
    return "\n".join(rows)
