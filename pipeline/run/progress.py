"""Progress lines from the markers (the durable truth of what is committed)."""
from __future__ import annotations

import time
from typing import Optional

from pipeline.output import storage


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Prints `progress: done/failed/total, cases/min, windows, ETA`."""

    def __init__(self, output: str, requested: list[int], out=None):
        self.output = output
        self.requested = set(requested)
        self.t0 = time.monotonic()
        self._windows: dict[int, int] = {}
        self._start_done: Optional[int] = None
        self._out = out

    def snapshot(self) -> dict:
        done = storage.marker_ids(self.output, storage.DONE) & self.requested
        failed = (storage.marker_ids(self.output, storage.FAILED) & self.requested) - done
        # Left out in stage 1 by the cohort's require (the file's track list): finished too.
        excluded = (storage.marker_ids(self.output, storage.EXCLUDED) & self.requested) - done - failed
        new = sorted(done - set(self._windows))
        if new:
            self._windows.update({c: m.windows for c, m in storage.read_done(self.output, new).items()})
        if self._start_done is None:
            self._start_done = len(done) + len(failed) + len(excluded)
        elapsed = time.monotonic() - self.t0
        finished = len(done) + len(failed) + len(excluded)
        rate = (finished - self._start_done) / (elapsed / 60) if elapsed > 0 else 0.0
        left = len(self.requested) - finished
        return {"done": len(done), "failed": len(failed), "excluded": len(excluded), "total": len(self.requested),
                "per_min": rate,
                "windows": sum(self._windows.values()), "eta_s": (left / rate * 60) if rate > 0 else None,
                "elapsed_s": elapsed}

    def line(self) -> str:
        s = self.snapshot()
        finished = s["done"] + s["failed"] + s["excluded"]
        eta = _fmt_eta(s["eta_s"]) if s["eta_s"] is not None else ("-" if finished < s["total"] else "0m00s")
        left_out = f", {s['excluded']} left out by --require" if s["excluded"] else ""
        return (f"progress: {s['done']}/{s['total']} cases done, {s['failed']} failed{left_out}, "
                f"{s['per_min']:.1f} cases/min, {s['windows']} windows, ETA {eta}")

    def __call__(self) -> None:
        import sys
        print(self.line(), file=self._out or sys.stdout, flush=True)
