"""Runs each Beam stage in a child process and keeps control of it.

Beam's DirectRunner cannot be cancelled, and raising from a signal handler
while `run()` blocks hung the main process in multi_processing mode
(measured). So the main process never runs a pipeline itself: it starts
the stage as a child in its own process group (forked, see _StageChild) and
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
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from typing import Callable, Optional

from pipeline.output.contracts import StageJob
from pipeline.run.runtime import StageRunner

KILLED = -signal.SIGKILL


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the child may outlive a SIGKILLed parent


class Supervisor(StageRunner):
    def __init__(self, grace_s: float = 30.0):
        self.grace_s = grace_s
        self._dir = tempfile.mkdtemp(prefix="master-poc-run-")
        self.stop_file = os.path.join(self._dir, "stop")
        self.stop_signal: Optional[int] = None
        self._stop_at: Optional[float] = None
        self.killed = False
        self._child: Optional["_StageChild"] = None
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
        if self.grace_s <= 0 and self._child is not None:  # no grace: the pipeline goes at once
            self._kill_child(self._child)

    def run_job(self, job: StageJob, progress: Optional[Callable[[], None]] = None,
                progress_interval_s: float = 30.0) -> tuple[int, dict[str, int]]:
        """Runs one stage in a child process group, told of this supervisor's
        stop file; returns (exit code, its counters)."""
        result = os.path.join(self._dir, f"job-{job.stage}.result.json")
        proc = self._child = _StageChild(dataclasses.replace(job, stop_file=self.stop_file), result)
        next_progress = time.monotonic() + progress_interval_s
        try:
            while True:
                now = time.monotonic()
                if self.stopping:
                    left = self._stop_at + self.grace_s - now
                    if left <= 0:
                        self._kill_child(proc)
                        return KILLED, {}
                    wait = min(left, 1.0)
                else:
                    wait = max(0.05, next_progress - now)
                stopping_before = self.stopping
                rc = proc.wait(timeout=wait, until=lambda: self.stopping != stopping_before)
                if self.killed:
                    return KILLED, {}
                if rc is not None:
                    break
                if progress and not self.stopping and time.monotonic() >= next_progress:
                    progress()
                    next_progress = time.monotonic() + progress_interval_s
        except BaseException:
            self._kill(proc)
            raise
        finally:
            self._child = None
        counts = {}
        if os.path.exists(result):
            with open(result) as fh:
                counts = json.load(fh).get("counters", {})
        return rc, counts

    def _kill_child(self, proc: "_StageChild") -> None:
        print(f"grace period over: killing the pipeline (pid {proc.pid} and its workers)", flush=True)
        self.killed = True
        self._kill(proc)

    @staticmethod
    def _kill(proc: "_StageChild") -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


class _StageChild:
    """The stage's process: forked from this one, so it starts with the
    modules already imported (importing Beam alone takes ~3 s, measured; a
    fresh process paid that once per stage). It leads its
    own process group (Beam's worker processes join it), dies with its
    parent, and inherits no signal handler and no open S3 connection."""

    def __init__(self, job: StageJob, result_path: str):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()
                _die_with_parent()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                from pipeline.run import runtime
                code = runtime.run_in_child(job, result_path)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid = pid
        self.returncode: Optional[int] = None

    def wait(self, timeout: Optional[float] = None, until: Callable[[], bool] = lambda: False) -> Optional[int]:
        """The exit code, or None if the child still runs after `timeout`
        seconds or once `until()` is true (a signal arrived)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            pid, status = os.waitpid(self.pid, 0 if deadline is None else os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif time.monotonic() >= deadline or until():
                return None
            else:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))  # waiting for a child, not a test
        return self.returncode
