"""The metadata as a typed record: `Metadata` and its parts, each counted
once from the markers (pipeline.output.metadata builds them) and turned
into preprocessing_metadata.json's JSON only at the edge (`as_json`).

    SplitCounts  one split's (or fold's) cases, windows, patients, files
    SplitRule    how the cases were split (the metadata's `split`)
    CaseAccount  what became of every requested case (the metadata's `cases`)
    Transfer     what reading remote input files cost
    Metadata     the whole record

The summary a person reads (pipeline.cli), the exit status (pipeline.api)
and the quality report's counts read these fields, never the JSON's keys;
the report's HTML and flow diagram are rendered from the JSON as written.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.io.identity import TableIdentity
from pipeline.output.contracts import DoneMarker, FailedMarker, Status


@dataclass(frozen=True)
class SplitCounts:
    """The cases with windows in one split (or fold): the metadata's
    `splits[name]`, the split rule's patients, the cohort's and the report's counts."""

    cases: int = 0
    windows: int = 0
    patients: int = 0  # split units: patients, or cases whose row names no patient
    case_ids: tuple[int, ...] = ()
    files: tuple[str, ...] = ()  # the split's file names (none where the output was not listed)

    def as_json(self) -> dict:
        return {"cases": self.cases, "windows": self.windows, "patients": self.patients,
                "case_ids": list(self.case_ids), "files": list(self.files)}


def split_counts(split_names: tuple[str, ...], done: dict[int, DoneMarker],
                 files: Optional[dict[str, list[str]]] = None) -> dict[str, SplitCounts]:
    """Per split, the committed cases with windows, their windows and their
    split units (patients), counted once; `files` the split files' names."""
    counts = {}
    for s in split_names:
        cases = sorted(c for c, m in done.items() if m.split == s and m.has_windows)
        counts[s] = SplitCounts(len(cases), int(sum(done[c].windows for c in cases)),
                                len({done[c].split_unit for c in cases}), tuple(cases),
                                tuple((files or {}).get(s, ())))
    return counts


@dataclass(frozen=True)
class SplitRule:
    """How the cases were split (contract 1.2): by patient or by case id, the
    rule, its seed and shares, the patients per split, and the cases split by
    case id because their row names no patient."""

    by: str  # "patient" or "case"
    key: str  # "subjectid" or "caseid"
    rule: str
    seed: int
    percent: tuple[int, ...]
    folds: int
    names: tuple[str, ...]
    patients: dict[str, int]
    cases_split_by_case_id: tuple[int, ...] = ()

    def as_json(self) -> dict:
        return {"by": self.by, "key": self.key, "rule": self.rule, "seed": self.seed, "percent": list(self.percent),
                "folds": self.folds, "names": list(self.names), "patients": dict(self.patients),
                "cases_split_by_case_id": list(self.cases_split_by_case_id)}


@dataclass(frozen=True)
class CaseAccount:
    """What became of the requested cases: the metadata's `cases`."""

    requested: int
    ok: tuple[int, ...] = ()
    too_short: tuple[int, ...] = ()
    failed: tuple[FailedMarker, ...] = ()
    not_done: tuple[int, ...] = ()
    static_defaults: dict[int, list] = field(default_factory=dict)
    # Clinical entry errors (outside the plausible range, not a number, a sex other
    # than M/F): treated as missing, so their features are in static_defaults too.
    static_implausible: dict[int, dict] = field(default_factory=dict)
    dose_weight_default: tuple[int, ...] = ()
    no_clinical_row: tuple[int, ...] = ()
    changed_inputs: tuple[int, ...] = ()  # processed again: the input file changed after an earlier commit

    @staticmethod
    def of(requested: int, done: dict[int, DoneMarker], failed: dict[int, FailedMarker],
           not_done: list[int]) -> "CaseAccount":
        ids = sorted(done)
        return CaseAccount(
            requested=requested,
            ok=tuple(c for c in ids if done[c].status == "ok"),
            too_short=tuple(c for c in ids if done[c].status == "too_short"),
            failed=tuple(f for _, f in sorted(failed.items())),
            not_done=tuple(not_done),
            static_defaults={c: done[c].static_defaults for c in ids if done[c].static_defaults},
            static_implausible={c: done[c].static_implausible for c in ids if done[c].static_implausible},
            dose_weight_default=tuple(c for c in ids if done[c].dose_weight_default),
            no_clinical_row=tuple(c for c in ids if done[c].no_clinical_row),
            changed_inputs=tuple(c for c in ids if done[c].changed_input))

    @property
    def success_rate(self) -> float:
        """ok / (ok + failed); 1 when neither."""
        n = len(self.ok) + len(self.failed)
        return 1.0 if n == 0 else len(self.ok) / n

    def as_json(self) -> dict:
        return {"requested": self.requested, "ok": list(self.ok), "too_short": list(self.too_short),
                "failed": [f.to_json() for f in self.failed], "not_done": list(self.not_done),
                "static_defaults": {str(c): v for c, v in self.static_defaults.items()},
                "static_implausible": {str(c): v for c, v in self.static_implausible.items()},
                "dose_weight_default": list(self.dose_weight_default),
                "no_clinical_row": list(self.no_clinical_row), "changed_inputs": list(self.changed_inputs)}


@dataclass(frozen=True)
class Transfer:
    """What reading the committed cases' remote input files cost."""

    cases: int
    bytes_read: int
    file_bytes: int
    share_read: Optional[float]
    requests: int
    retries: int

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Metadata:
    """preprocessing_metadata.json as a record. `settings`, `format`, `spec`,
    `statistics`, `provenance`, `config` and `table1` are JSON documents of
    their own (each built by its one function); the rest are typed."""

    status: Status
    started: str
    finished: str
    input: Optional[str]
    source: Optional[dict]
    clinical: Optional[str]
    clinical_table: Optional[TableIdentity]
    output: str
    settings: dict
    format: dict
    spec: dict
    splits: dict[str, SplitCounts]
    split: SplitRule
    transfer: Optional[Transfer]
    statistics: dict
    cases: CaseAccount
    verification: Any  # pipeline.stages.verify.Verification, or None
    provenance: dict
    config: dict
    cohort: Any = None  # pipeline.output.cohort.CohortSummary
    table1: Optional[dict] = None
    timings: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "status": self.status, "started": self.started, "finished": self.finished, "input": self.input,
            "source": self.source, "clinical": self.clinical,
            "clinical_table": self.clinical_table.to_json() if self.clinical_table is not None else None,
            "output": self.output, "settings": self.settings, "format": self.format, "spec": self.spec,
            "splits": {s: c.as_json() for s, c in self.splits.items()},
            "split": self.split.as_json(),
            "transfer": self.transfer.as_json() if self.transfer is not None else None,
            "statistics": self.statistics,
            "cases": self.cases.as_json(),
            "verification": self.verification.as_json() if self.verification is not None else None,
            "versions": self.provenance["versions"],  # also in provenance; kept here for readers of earlier outputs
            "provenance": self.provenance,
            "config": self.config,
            "cohort": self.cohort.as_json() if self.cohort is not None else None,
            "table1": self.table1,
            "timings": self.timings,
        }
