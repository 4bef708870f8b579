"""Runs each Beam stage in a child process and keeps control of it.

Beam's DirectRunner cannot be cancelled, and raising from a signal handler
while `run()` blocks hung the main process in multi_processing mode
(BEAM_NOTES.md). So the main process never runs a pipeline itself: it starts
the stage as a child in its own process group (`python -m pipeline.job`) and
waits. On SIGTERM/SIGINT (SageMaker sends SIGTERM at MaxRuntime and before a
spot reclaim) it creates a stop file that the workers check before each case,
so the pipeline drains by itself: cases in flight are committed, no new one
is started. If the child has not finished within the grace period, its whole
process group (Beam's worker processes included) is killed. Commits are
atomic, so either way nothing partial is counted. The child also dies with
its parent (PR_SET_PDEATHSIG), so a killed main process leaves no pipeline
running on its own.

While it waits, the supervisor prints progress from the markers.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

_LOG = logging.getLogger("master_poc")
KILLED = -signal.SIGKILL


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the child may outlive a SIGKILLed parent


class Supervisor:
    def __init__(self, grace_s: float = 30.0, progress: Optional[Callable[[], None]] = None,
                 progress_interval_s: float = 30.0):
        self.grace_s = grace_s
        self.progress = progress
        self.progress_interval_s = progress_interval_s
        self._dir = tempfile.mkdtemp(prefix="master-poc-run-")
        self.stop_file = os.path.join(self._dir, "stop")
        self.stop_signal: Optional[int] = None
        self._stop_at: Optional[float] = None
        self.child_killed = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        for name in os.listdir(self._dir):
            os.remove(os.path.join(self._dir, name))
        os.rmdir(self._dir)

    @property
    def stopping(self) -> bool:
        return self.stop_signal is not None

    def _on_signal(self, signum, frame) -> None:
        if self.stopping:
            return
        self.stop_signal = signum
        self._stop_at = time.monotonic()
        open(self.stop_file, "w").close()
        print(f"received {signal.Signals(signum).name}: finishing the cases in flight, starting no new one "
              f"(grace {self.grace_s:.0f} s)", flush=True)

    def run_job(self, payload: dict) -> tuple[int, dict]:
        """Runs one stage as `python -m pipeline.job`; returns (exit code, its result)."""
        job = os.path.join(self._dir, f"job-{payload['stage']}.json")
        result = job + ".result"
        with open(job, "w") as fh:
            json.dump(dict(payload, stop_file=self.stop_file, result_file=result), fh)
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.job", job], start_new_session=True,
                                preexec_fn=_die_with_parent)
        next_progress = time.monotonic() + self.progress_interval_s
        try:
            while True:
                now = time.monotonic()
                if self.stopping:
                    left = self._stop_at + self.grace_s - now
                    if left <= 0:
                        print(f"grace period over: killing the pipeline (pid {proc.pid} and its workers)", flush=True)
                        self._kill(proc)
                        self.child_killed = True
                        return KILLED, {}
                    wait = min(left, 1.0)
                else:
                    wait = max(0.05, next_progress - now)
                try:
                    rc = proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    if self.progress and not self.stopping and time.monotonic() >= next_progress:
                        self.progress()
                        next_progress = time.monotonic() + self.progress_interval_s
        except BaseException:
            self._kill(proc)
            raise
        res = {}
        if os.path.exists(result):
            with open(result) as fh:
                res = json.load(fh)
        return rc, res

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
