"""A short soak (scripts/soak.py): real neurons and cortex, mixed and abusive traffic, every check must pass.

The soak checks the budget invariants (spent <= balance, window use <= cap,
nothing held or in flight afterwards, no open hold, no settle overrun, a
consistent ledger) and cortex's resources (client sockets released, fds back
to their post-warm-up count, bounded RSS, stalled bodies timed out); see the
script's docstring for the thresholds. It is its own subprocess so that the
fd and RSS figures are cortex's alone.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_short_soak_passes_every_check(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    argv = [
        sys.executable, str(ROOT / "scripts" / "soak.py"),
        "--duration-s", "10", "--seed", "1", "--concurrency", "8", "--keep-logs", str(logs),
    ]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"soak failed (exit {proc.returncode}); daemon logs in {logs}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr (tail) ---\n{proc.stderr[-4000:]}"
    )
    assert "checks passed" in proc.stdout, proc.stdout
