"""Several processes (hosts, pods, array tasks) sharing one job, runner-agnostic.

Each process is told its share as I/N (1-based): it runs stage 1 on the cases
whose position in the requested list is congruent to I-1 modulo N and commits
them to the shared output. Share 1 is the leader: it then waits, bounded,
until every requested case has a marker (done or failed) and runs stage 2 and
verification. Nothing else is exchanged: the markers in the output are the
only coordination, so any scheduler that can start N processes with an index
works (SageMaker hosts, a Kubernetes Indexed Job, an AWS Batch array job, a
Slurm array; see the README's recipes). A restarted process simply reruns its
share; committed cases are skipped.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

from pipeline.output import storage

_SHARE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Share:
    index: int  # 1-based
    count: int

    @staticmethod
    def parse(value) -> "Share":
        if isinstance(value, Share):
            return value
        m = _SHARE.match(str(value))
        if not m:
            raise ValueError("expected I/N, e.g. 2/6 (1-based: the first of 6 is 1/6)")
        share = Share(int(m.group(1)), int(m.group(2)))
        if not 1 <= share.index <= share.count:
            raise ValueError(f"I must be between 1 and N (got {share.index} of {share.count}; "
                             "a 0-based index must be converted: I = index + 1)")
        return share

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def leader(self) -> bool:
        return self.index == 1

    def select(self, case_ids: list[int]) -> list[int]:
        """This share's cases: positions congruent to index-1 modulo count."""
        return [c for i, c in enumerate(case_ids) if i % self.count == self.index - 1]


def unmarked(output: str, case_ids: list[int]) -> list[int]:
    """Requested cases that have no done, failed or excluded marker."""
    marked = (storage.marker_ids(output, storage.DONE) | storage.marker_ids(output, storage.FAILED)
              | storage.marker_ids(output, storage.EXCLUDED))
    return [c for c in case_ids if c not in marked]


def wait_for_markers(output: str, case_ids: list[int], wait_s: float, poll_s: float,
                     stopping: Callable[[], bool] = lambda: False, say: Callable[[str], None] = print,
                     clock: Callable[[], float] = time.monotonic,
                     sleep: Callable[[float], None] = time.sleep) -> list[int]:
    """The leader's wait: polls the markers until every case has one, the
    wait runs out or `stopping()`; returns the cases still without one."""
    deadline = clock() + wait_s
    while True:
        missing = unmarked(output, case_ids)
        if not missing or stopping() or clock() >= deadline:
            return missing
        say(f"leader: waiting for {len(missing)} cases from the other shares")
        sleep(max(0.0, min(poll_s, deadline - clock())))  # polling shared storage, by design
