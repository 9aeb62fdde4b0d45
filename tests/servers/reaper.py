"""Ends a session's test servers once the process that started them is gone.

``python -m tests.servers.reaper FOLDER PARENT_PID``, started by ``Workspace``: it waits until its
parent dies (it is then re-parented; the pid is passed in, as the parent may die before this
process has even started) or until it is terminated (a clean close), then kills every process
group listed in ``FOLDER/pids`` and removes the folder. Standard library only; it must outlive a
killed pytest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from pathlib import Path

PIDS_FILE = "pids"


def reap(folder: Path) -> None:
    with contextlib.suppress(OSError):
        for line in (folder / PIDS_FILE).read_text().split():
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.killpg(int(line), signal.SIGKILL)
    shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    folder, parent = Path(sys.argv[1]), int(sys.argv[2])
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while not stop and os.getppid() == parent:
        time.sleep(0.5)
    if not stop:  # the parent died without closing: clean up after it
        reap(folder)


if __name__ == "__main__":
    main()
