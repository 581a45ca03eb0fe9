"""What a test run leaves in the checkout it runs from (git's view of untracked and ignored paths)."""

from __future__ import annotations

import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
MADE_BY_ANY_RUN = ("__pycache__/", ".pytest_cache/")  # Python's and pytest's own caches


def checkout_extras(root: Path = CHECKOUT) -> set[str] | None:
    """The checkout's untracked and ignored paths as git lists them (a new folder as one entry); None without git."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored"], check=False, cwd=root, capture_output=True, text=True,
                             timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return {line[3:] for line in out.stdout.splitlines() if line[:2] in ("??", "!!")}


def allowed_folders(*folders: str | None, root: Path = CHECKOUT) -> tuple[str, ...]:
    """Folders inside the checkout a run writes to on purpose (the page test's screenshot), as git names them."""
    out = []
    for f in folders:
        if f and Path(f).resolve().is_relative_to(root.resolve()):
            out.append(Path(f).resolve().relative_to(root.resolve()).as_posix() + "/")
    return tuple(out)


def left_in_checkout(before: set[str], after: set[str], allowed: tuple[str, ...] = ()) -> list[str]:
    """What appeared in the checkout during the run, less the caches any run makes and the ``allowed`` folders."""
    return sorted(p for p in after - before if not p.endswith(MADE_BY_ANY_RUN) and not p.startswith(allowed))
