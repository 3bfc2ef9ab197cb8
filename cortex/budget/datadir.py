"""The data dir: the ledger database, the lock that says a server owns it, and its admin socket."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LEDGER_FILE = "ledger.db"
LOCK_FILE = "cortex.lock"
SOCKET_FILE = "admin.sock"


class DataDirBusy(Exception):
    pass


def ledger_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / LEDGER_FILE


def socket_path(data_dir: str | Path) -> Path:
    """Where a running server serves its admin API to the CLI (cortex/admin_socket.py)."""
    return Path(data_dir) / SOCKET_FILE


def lock(data_dir: str | Path) -> IO[str]:
    """Take the data dir's exclusive lock; held until the returned file is closed.

    The in-memory ledger is authoritative while cortex serves, so offline
    edits to its database must wait until it stops.
    """
    path = Path(data_dir)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle = open(path / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise DataDirBusy(f"{path} is in use by a running cortex (pid in {path / LOCK_FILE})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
