"""The contracts between the stages, each one type with its JSON form here.

    DoneMarker   cases/_done/<id>.json: a committed case (stage 1 -> stage 2,
                 metadata, report, progress, resume)
    FailedMarker cases/_failed/<id>.json: a failed case and why
    ShardPlan    one split file to write: which cases, which gzip members (stage 2)
    StageJob     what the stage process runs (driver -> pipeline.job.run_stage)

Readers get these types, never loose dicts. `from_json` ignores keys it does
not know and fills fields an older marker lacks with their defaults.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from transforms.case import CaseFacts
from transforms.load import ClinicalTable
from transforms.settings import Settings
from transforms.sources import Source


def _known(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass(frozen=True)
class Member:
    """One gzip member of a case object: its compressed bytes and records."""

    nbytes: int
    records: int


@dataclass
class DoneMarker(CaseFacts):
    """A committed case: its facts plus where and how it was committed."""

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
    def patient(self) -> str:
        """The split key: "s<subjectid>" (the patient), or the case id where none is known."""
        return self.split_key or str(self.case_id)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["members"] = [[m.nbytes, m.records] for m in self.members]
        return d

    @staticmethod
    def from_json(d: dict) -> "DoneMarker":
        d = _known(DoneMarker, d)
        members = d.get("members") or ([[d["object_bytes"], d["windows"]]] if d.get("object_bytes") else [])
        d["members"] = tuple(Member(int(b), int(r)) for b, r in members)
        return DoneMarker(**d)


@dataclass(frozen=True)
class FailedMarker:
    case_id: int
    reason: str  # missing_file, corrupt_file, no_tracks, duplicate_clinical_row, damaged_case_object, ...
    detail: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "FailedMarker":
        return FailedMarker(**_known(FailedMarker, d))


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

    def to_json(self) -> dict:
        return {"split": self.split, "index": self.index, "count": self.count,
                "cases": [[c.case_id, c.windows, c.path, [[m.nbytes, m.records] for m in c.members]]
                          for c in self.cases]}

    @staticmethod
    def from_json(d: dict) -> "ShardPlan":
        return ShardPlan(d["split"], d["index"], d["count"],
                         tuple(PlannedCase(c[0], c[1], c[2], tuple(Member(*m) for m in c[3])) for c in d["cases"]))


@dataclass
class StageJob:
    """One Beam stage for the stage process: stage 1 (case ids, their source,
    clinical table) or stage 2 (shard plans)."""

    stage: int
    output: str
    settings: Settings
    beam_args: list = field(default_factory=list)
    verbose: bool = False
    s3_max_attempts: int = 10
    s3_retry_mode: str = "standard"
    case_ids: list = field(default_factory=list)
    source: Optional[Source] = None
    clinical: Optional[ClinicalTable] = None
    plans: list = field(default_factory=list)
    stop_file: Optional[str] = None  # touched on SIGTERM: stage 1 takes no new case
