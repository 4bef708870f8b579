"""The cohort in a run: which requested cases its criteria keep, decided
with the least work, and recorded as excluded markers.

    plan        before stage 1: the clinical criteria on the clinical table;
                require on a track table where there is one (--track-list, or
                the web API's /trks with --input vitaldb), else on the tracks
                the output's markers recorded; min_measured on the committed
                cases' shares. What is left undecided, stage 1 decides (a
                require from the file's own track information, read alone;
                min_measured from what it commits: `settle`).
    record      writes the excluded markers of this process's cases and
                removes those that no longer hold.
    settle      after stage 1: min_measured for the cases it committed.
    flow        from the markers: requested -> each criterion -> selected.

An excluded case keeps its done marker and case object if it has them, so a
case selected again costs nothing; stage 2 writes only the selected ones
(storage.read_selected_done). Criteria are not part of the data's
fingerprint: changing them on an output re-decides from what is recorded.
"""
from __future__ import annotations

import dataclasses
import io
import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import pandas as pd

from pipeline.io.clinical import ClinicalTable, _decode
from pipeline.io.sources import read_document
from pipeline.output import storage
from pipeline.output.contracts import DoneMarker
from pipeline.output.records import CaseAccount, SplitCounts
from transforms import cohort, spec
from transforms.cohort import MIN_MEASURED, REQUIRE, Criterion, Exclusion

_LOG = logging.getLogger("master_poc")


class CohortRefused(ValueError):
    """Criteria that cannot be used, or that leave no case: exit 2, nothing written."""


def read_track_table(path: str, web=None) -> pd.DataFrame:
    """A track table as VitalDB's API serves it at /trks (caseid, tname,
    tid; CSV, gzip-encoded or not): its caseid and tname columns. One name
    twice in one case (two tids) is one track present."""
    try:
        text, _ = _decode(read_document(path, web))
    except Exception as e:  # any filesystem's or server's "cannot read"
        raise CohortRefused(f"cannot read the track list {path}: {e}") from None
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise CohortRefused(f"the track list {path} is not a readable CSV table: {e}") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing = [c for c in ("caseid", "tname") if c not in table.columns]
    if missing:
        raise CohortRefused(f"the track list {path} has no {', '.join(missing)} column (columns: "
                            f"{', '.join(table.columns[:8])}); expected caseid,tname[,tid] as VitalDB's /trks")
    ids = pd.to_numeric(table["caseid"], errors="coerce")
    table = table.assign(caseid=ids).dropna(subset=["caseid", "tname"])
    return pd.DataFrame({"caseid": table["caseid"].astype("int64"), "tname": table["tname"].str.strip()})


def recorded_tracks(m: DoneMarker, fs: spec.FeatureSpec) -> list[str]:
    """The source tracks a committed case's file has (its marker records
    them; a marker of an earlier version: the sources that gave seconds)."""
    if m.tracks is not None:
        return list(m.tracks)
    counts = m.stats.sources if m.stats else []
    return [s.track for f, row in zip(fs.timeseries, counts) for s, n in zip(f.sources, row) if n]


@dataclass
class CohortPlan:
    criteria: tuple[Criterion, ...]  # in evaluation order
    requested: list[int]
    by_inputs: dict[int, Exclusion]  # decided from the clinical table and track table: every share agrees
    track_list: Optional[str] = None  # the track table used, if any
    unlisted: frozenset = frozenset()  # cases the track table does not list: their require from their file

    @property
    def work(self) -> list[int]:
        """The requested cases the inputs do not exclude: what the shares split."""
        return [c for c in self.requested if c not in self.by_inputs]

    @property
    def needs_markers(self) -> bool:
        return any(c.kind == MIN_MEASURED or (c.kind == REQUIRE and (self.track_list is None or self.unlisted))
                   for c in self.criteria)

    def require_from_markers(self, case_id: int) -> bool:
        """Whether this case's require is decided from what its file holds (no track table lists it)."""
        return any(c.kind == REQUIRE for c in self.criteria) and (self.track_list is None or case_id in self.unlisted)


def plan(requested: list[int], criteria: Iterable[Criterion], clinical: ClinicalTable, fs: spec.FeatureSpec,
         track_table: Optional[pd.DataFrame] = None, track_list: Optional[str] = None) -> CohortPlan:
    """The decisions the inputs allow, for every share alike. Refuses
    criteria that leave no case (naming the one after which none is left)."""
    crit = cohort.ordered(criteria)
    frame = clinical.frame if clinical.frame is not None else pd.DataFrame({"caseid": []})
    ex = cohort.clinical_exclusions(requested, crit, frame, clinical.duplicates)
    unlisted: frozenset = frozenset()
    if track_table is not None:
        left = [c for c in requested if c not in ex]
        ex.update(cohort.table_require_exclusions(left, crit, track_table, fs))
        listed = set(track_table["caseid"].unique().tolist())
        unlisted = frozenset(c for c in left if c not in listed)
        if unlisted and any(c.kind == REQUIRE for c in crit):
            _LOG.warning("the track list %s lists %d of the requested cases not at all (e.g. %s): their --require "
                         "is decided from their own file", track_list, len(unlisted), sorted(unlisted)[:10])
    p = CohortPlan(crit, list(requested), ex, track_list if track_table is not None else None, unlisted)
    if crit and requested and not p.work:
        left = len(requested)
        for c in crit:
            left -= sum(1 for e in ex.values() if e.criterion == c)
            if left == 0:
                raise CohortRefused(f"no case is left after {c} (of {len(requested)} requested): nothing was "
                                    "processed; loosen the criteria or request other cases")
    return p


def decide_from_markers(output: str, ids: list[int], p: CohortPlan, fs: spec.FeatureSpec
                        ) -> tuple[dict[int, Exclusion], frozenset[int]]:
    """For these cases (the inputs keep them): require from the tracks the
    markers recorded (where no track table was read) and min_measured from
    the committed cases' shares. Returns the exclusions and the cases whose
    require stage 1 must decide from their file."""
    if not p.needs_markers or not ids:
        return {}, frozenset()

    done_ids, excluded_ids = storage.marker_ids(output, storage.DONE), storage.marker_ids(output, storage.EXCLUDED)
    done = storage.read_done(output, [c for c in ids if c in done_ids])
    old = storage.read_excluded(output, [c for c in ids if c in excluded_ids and c not in done])
    out: dict[int, Exclusion] = {}
    check: set[int] = set()
    for c in ids:
        m = done.get(c)
        if p.require_from_markers(c):
            tracks = recorded_tracks(m, fs) if m else (old[c].tracks if c in old else None)
            if tracks is None:
                check.add(c)
                continue
            missing = cohort.first_missing_requirement(tracks, p.criteria, fs)
            if missing is not None:
                out[c] = Exclusion(c, REQUIRE, missing.text, tracks=tuple(tracks))
                continue
        if m is not None:
            unmet = cohort.first_unmet_share(cohort.measured_shares(m.stats, fs), p.criteria)
            if unmet is not None:
                out[c] = dataclasses.replace(unmet, case_id=c)
    return out, frozenset(check)


def record(output: str, ids: Iterable[int], exclusions: dict[int, Exclusion],
           pending: frozenset = frozenset()) -> None:
    """Makes the excluded markers of `ids` say `exclusions`: new or changed
    ones written, those of cases now selected removed; but a marker that a
    stage 1 wrote from the file's tracks for a `pending` case (one whose
    require is decided there, perhaps by another share right now) stays."""
    ids = list(ids)
    present = storage.marker_ids(output, storage.EXCLUDED)
    old = storage.read_excluded(output, [c for c in ids if c in present])
    storage.write_excluded(output, [e for c, e in exclusions.items() if old.get(c) != e])
    storage.delete_excluded(output, [c for c, e in old.items() if c not in exclusions
                                     and not (c in pending and e.tracks is not None)])


def settle(output: str, ids: Iterable[int], p: CohortPlan, fs: spec.FeatureSpec) -> int:
    """min_measured for the committed cases among `ids` that no marker
    excludes yet (stage 1 committed them); returns how many it excluded."""
    if not any(c.kind == MIN_MEASURED for c in p.criteria):
        return 0
    keep = storage.marker_ids(output, storage.DONE) - storage.marker_ids(output, storage.EXCLUDED)
    done = storage.read_done(output, [c for c in ids if c in keep])
    new = []
    for c, m in done.items():
        unmet = cohort.first_unmet_share(cohort.measured_shares(m.stats, fs), p.criteria)
        if unmet is not None:
            new.append(dataclasses.replace(unmet, case_id=c))
    storage.write_excluded(output, new)
    return len(new)


def flow(output: str, requested: list[int], criteria: Iterable[Criterion]) -> cohort.Flow:
    """The cohort's flow from the requested cases' excluded markers. A
    marker naming a criterion not given now (an output whose criteria
    changed without a rerun) is listed after them."""
    ids = storage.marker_ids(output, storage.EXCLUDED) & set(requested)
    exclusions = storage.read_excluded(output, sorted(ids))
    crit = list(cohort.ordered(criteria))
    crit += list(dict.fromkeys(e.criterion for e in exclusions.values() if e.criterion not in crit))
    return cohort.flow(requested, crit, exclusions)


# A target feature with a source track in fewer of the selected cases is warned about.
RARE_TARGET_SHARE = 0.20


@dataclass(frozen=True)
class FeatureCoverage:
    """One feature over the selected committed cases: how many have one of
    its source tracks, and the share of their used seconds that was measured."""

    cases: int
    cases_with_source: int
    share_of_cases: Optional[float]
    measured_share_of_seconds: Optional[float]
    target: bool

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def coverage(done: dict[int, DoneMarker], fs: spec.FeatureSpec) -> dict[str, FeatureCoverage]:
    """Per feature, its coverage (FeatureCoverage) over these cases."""
    from transforms.features import MEASURED
    n = len(done)
    out = {}
    for j, f in enumerate(fs.timeseries):
        srcs = {s.track for s in f.sources}
        with_track = [m for m in done.values() if srcs & set(recorded_tracks(m, fs))]
        seconds = sum(m.stats.seconds for m in with_track if m.stats)
        measured = sum(int(m.stats.rules[j][MEASURED]) for m in with_track if m.stats and m.stats.rules)
        out[f.name] = FeatureCoverage(n, len(with_track), round(len(with_track) / n, 4) if n else None,
                                      round(measured / seconds, 4) if seconds else None, f.name in fs.targets)
    return out


def rare_target_warnings(cov: dict[str, FeatureCoverage]) -> list[str]:
    """"Noradrenalin_INF: a source track in 2 of 140 cases (1.4 %); its target is a clinical zero in the others"."""
    return [f"{name}: a source track in {c.cases_with_source} of {c.cases} cases ({100 * c.share_of_cases:.1f} %); "
            "its target is a clinical zero in the others"
            for name, c in cov.items() if c.target and c.cases and c.share_of_cases < RARE_TARGET_SHARE]


@dataclass(frozen=True)
class CohortSummary:
    """The metadata's `cohort`: the flow (requested -> each criterion ->
    selected), then what became of the selected cases (processed -> too
    short / failed -> per split), the track table used, and each feature's coverage."""

    flow: cohort.Flow
    track_list: Optional[str]
    cases: CaseAccount
    splits: dict[str, SplitCounts]
    coverage: dict[str, FeatureCoverage]

    @property
    def warnings(self) -> list[str]:
        return rare_target_warnings(self.coverage)

    def as_json(self) -> dict:
        c = self.cases
        return {**self.flow.as_json(),
                "track_list": self.track_list,
                "processed": {"ok": len(c.ok), "too_short": len(c.too_short), "failed": len(c.failed),
                              "not_done": len(c.not_done)},
                "splits": {s: {"cases": d.cases, "patients": d.patients, "windows": d.windows}
                           for s, d in self.splits.items()},
                "coverage": {n: v.as_json() for n, v in self.coverage.items()},
                "warnings": self.warnings}


def plural(count: int, noun: str) -> str:
    """'1 case', '2 cases': the summary's, the flow diagram's and the cohort's counts."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _ids(ids: list[int], n: int = 30) -> str:
    return "[" + ", ".join(map(str, ids[:n])) + (", ..." if len(ids) > n else "") + "]"


def summary_lines(c: Optional[CohortSummary]) -> list[str]:
    """The flow, one line per step, for the run's summary."""
    if c is None:
        return []
    f = c.flow
    lines = [f"  cohort: {f.requested} requested"]
    left = f.requested
    for step in f.steps:
        n = len(step.excluded)
        left -= n
        lines.append(f"    left out by {cohort.flag_of(step.kind)} {step.text!r}: {n} {_ids(list(step.excluded))}; "
                     f"{left} remain")
    p = c.cases
    lines.append(f"    {f.selected} selected and processed: {len(p.ok)} with windows, {len(p.too_short)} too short, "
                 f"{len(p.failed)} failed" + (f", {len(p.not_done)} not done yet" if p.not_done else ""))
    lines.append("    " + "; ".join(f"{s}: {plural(d.cases, 'case')}, {plural(d.patients, 'patient')}, "
                                    f"{plural(d.windows, 'window')}" for s, d in c.splits.items()))
    measured = [f"{n} {100 * d.measured_share_of_seconds:.0f} %" for n, d in c.coverage.items()
                if d.measured_share_of_seconds is not None]
    with_source = [f"{n} {d.cases_with_source}/{d.cases}" for n, d in c.coverage.items()]
    lines.append("  coverage, cases with a source track: " + ", ".join(with_source))
    if measured:
        lines.append("  measured share of their used seconds: " + ", ".join(measured))
    lines += [f"  WARNING: {w}" for w in c.warnings]
    return lines
