"""Decode functions for converter fault tests. They live in an importable module (not a test file) because the
converter pickles `pipeline.data.convert.DECODE` by reference into its forkserver workers, which import it by name."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pipeline.data.convert import decode_item

VICTIM = "victim"  # the file stem whose decode kills its own worker, as the kernel's OOM killer would


def die_on_victim(task):
    if Path(task[0].path).stem == VICTIM:
        os.kill(os.getpid(), signal.SIGKILL)
    return decode_item(task)


def slow(task):
    """A slow decoder (50 ms a file), so a test can kill the converter while it is mid-run."""
    time.sleep(0.05)
    return decode_item(task)
