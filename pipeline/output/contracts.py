"""The contracts between the stages, each one type (the markers with their
JSON form here).

    Status       how a run, a finalize or a verify ended
    DoneMarker   cases/_done/<id>.json: a committed case (stage 1 -> stage 2,
                 metadata, report, progress, resume)
    FailedMarker cases/_failed/<id>.json: a failed case and why (the same type
                 as stage 1's dead letters, transforms.per_case.CaseFailure)
    ShardPlan    one split file to write: which cases, which gzip members (stage 2)
    StageJob     what a stage runs (pipeline.run.runtime.run_stage)

Readers get these types, never loose dicts. `from_json` ignores keys it does
not know and fills fields an older marker lacks with their defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar, Optional

from pipeline.io.clinical import ClinicalTable
from pipeline.io.identity import FileIdentity, TableIdentity, known_fields
from pipeline.io.sources import Source
from pipeline.io.vital import StepSeconds
from transforms.per_case import CaseFacts, CaseFailure, CaseStats
from transforms.settings import Settings


class Status(str, Enum):
    """How a command ended (RunResult.status; the metadata's status is one of
    the first three). A str, so it is written into JSON as its value."""

    COMPLETE = "complete"  # every requested case marked, split files written and verified
    INCOMPLETE = "incomplete"  # cases without a marker (interrupted, a leader that stopped waiting)
    VERIFICATION_FAILED = "verification_failed"
    STAGE1_DONE = "stage1_done"  # this share's stage 1; finalize is owed elsewhere or later
    VERIFIED = "verified"  # verify: the output reads back as its markers say
    REFUSED = "refused"  # bad input, said before any work
    FAILED = "failed"  # a stage's pipeline failed
    INTERRUPTED = "interrupted"  # SIGTERM/SIGINT

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Member:
    """One gzip member of a case object: its compressed bytes and records."""

    nbytes: int
    records: int


@dataclass
class DoneMarker(CaseFacts):
    """A committed case: its facts, where it came from (its CaseOrigin's
    fields) and where and how it was committed."""

    timings: StepSeconds = field(default_factory=StepSeconds)
    input: Optional[FileIdentity] = None
    changed_input: Optional[FileIdentity] = None  # an earlier commit's, when the file's content changed since
    clinical: Optional[TableIdentity] = None
    tracks: Optional[list] = None  # the features' source tracks its file has (None: a marker before 1.3)
    status: str = "ok"  # "ok" (windows written) or "too_short" (no window, not an error)
    host: str = ""
    worker: int = 0  # process id of the worker that committed it
    committed: float = 0.0  # unix time, after the object was written
    object: Optional[str] = None  # informational; readers take the path from storage.case_object
    object_bytes: int = 0
    members: tuple[Member, ...] = ()

    @property
    def has_windows(self) -> bool:
        return self.windows > 0

    @property
    def split_unit(self) -> str:
        """What the split keeps together: "s<subjectid>" (a patient), or the case
        id where the clinical row names no patient (then the case is its own unit)."""
        return self.split_key or str(self.case_id)

    def to_json(self) -> dict:
        # Shallow: the fields hold JSON values but the typed ones (identities, timings,
        # statistics), which convert their own (dataclasses.asdict deep-copies, ~5 ms per
        # 4-hour case, measured). A missing identity is written as markers always wrote it.
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("input", "changed_input", "clinical"):
            d[k] = d[k].to_json() if d[k] is not None else (None if k == "changed_input" else {})
        d["timings"] = self.timings.to_json()
        d["stats"] = self.stats.to_json() if self.stats is not None else {}
        d["members"] = [[m.nbytes, m.records] for m in self.members]
        return d

    @staticmethod
    def from_json(d: dict) -> "DoneMarker":
        d = known_fields(DoneMarker, d)
        d["stats"] = CaseStats.from_json(d["stats"]) if d.get("stats") else None
        members = d.get("members") or ([[d["object_bytes"], d["windows"]]] if d.get("object_bytes") else [])
        d["members"] = tuple(Member(int(b), int(r)) for b, r in members)
        d["input"] = FileIdentity.from_json(d.get("input"))
        d["changed_input"] = FileIdentity.from_json(d.get("changed_input"))
        d["clinical"] = TableIdentity.from_json(d.get("clinical"))
        d["timings"] = StepSeconds.from_json(d.get("timings"))
        return DoneMarker(**d)


def units_in_two_splits(placed) -> dict[str, list[tuple[str, int]]]:
    """The split units (patients) found in more than one split, from
    (unit, split, case id) triples: {unit: [(split, a case of it there), ...]}.
    The report asks it of the markers, verify of what the split files hold."""
    where: dict[str, dict[str, int]] = {}
    for unit, split, case_id in placed:
        where.setdefault(unit, {}).setdefault(split, case_id)
    return {u: sorted(s.items()) for u, s in where.items() if len(s) > 1}


# A failed case and why: the dead letter of stage 1's DoFns, written as is.
FailedMarker = CaseFailure


@dataclass(frozen=True)
class PlannedCase:
    case_id: int
    windows: int
    path: str  # the case object
    members: tuple[Member, ...]


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    count: int
    cases: tuple[PlannedCase, ...]

    @property
    def windows(self) -> int:
        return sum(c.windows for c in self.cases)


@dataclass
class StageJob:
    """What every Beam stage the stage process runs is given: the output, the
    data settings and the Beam flags (the S3 settings are the run process's, which
    the stage process inherits: pipeline.run.runtime.setup_io). One type per stage."""

    stage: ClassVar[int] = 0
    output: str = ""
    settings: Settings = field(default_factory=Settings)
    beam_args: list = field(default_factory=list)
    verbose: bool = False
    stop_file: Optional[str] = None  # touched on SIGTERM: stage 1 takes no new case


@dataclass
class Stage1Job(StageJob):
    """Stage 1: the case ids, their source and clinical table; the cohort's
    require criteria and the cases to hold against them by their file's track list."""

    stage: ClassVar[int] = 1
    case_ids: list = field(default_factory=list)
    source: Optional[Source] = None
    clinical: Optional[ClinicalTable] = None
    require: tuple = ()
    check_tracks: frozenset = frozenset()


@dataclass
class Stage2Job(StageJob):
    """Stage 2: the shard plans to write."""

    stage: ClassVar[int] = 2
    plans: list = field(default_factory=list)
