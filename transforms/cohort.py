"""The cohort: which requested cases a study keeps, and why each other one is out.

Criteria, in the order a study writes them:

    include EXPR         keep a case when EXPR (pandas DataFrame.query, engine
                         "python") is true for its clinical row; a case with no
                         row fails every include
    exclude EXPR         drop a case when EXPR is true for its row
    require F1,F2,...    keep a case when each feature has one of its source
                         tracks in the case's track list
    min_measured F=X     keep a case when at least the fraction X of its used
                         seconds have a measured value of feature F

Evaluation order: include/exclude as given, then require, then min_measured;
a case is counted at the first criterion it fails (`ordered`). Everything
here is pure: tables, track sets and shares in, decisions out. Where the
track lists and shares come from, and the markers that record the decisions,
is pipeline.output.cohort's business.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Optional

import numpy as np
import pandas as pd

from transforms import spec

if TYPE_CHECKING:
    from transforms.per_case import CaseStats

INCLUDE, EXCLUDE, REQUIRE, MIN_MEASURED = "include", "exclude", "require", "min_measured"
KINDS = (INCLUDE, EXCLUDE, REQUIRE, MIN_MEASURED)
CLINICAL_KINDS = (INCLUDE, EXCLUDE)
# The stage at which each kind is decided (evaluation order).
_STAGE = {INCLUDE: 0, EXCLUDE: 0, REQUIRE: 1, MIN_MEASURED: 2}
# A study's criteria are a handful; the help's examples.
EXAMPLES = {
    INCLUDE: ["age >= 18", "ane_type == 'General'", "department in ['General surgery', 'Thoracic surgery']"],
    EXCLUDE: ["opname.str.contains('transplant', case=False, na=False)", "asa >= 4"],
    REQUIRE: ["Propofol_INF,Remifentanil_INF", "BP_MAP"],
    MIN_MEASURED: ["BP_MAP=0.8", "Propofol_INF=0.5"],
}


class CohortError(ValueError):
    """A criterion that cannot be used; the message names it."""


def flag_of(kind: str) -> str:
    """The command-line flag of a criterion kind: min_measured -> --min-measured."""
    return "--" + kind.replace("_", "-")


@dataclass(frozen=True)
class Criterion:
    kind: str
    text: str  # exactly as given

    @property
    def flag(self) -> str:
        return flag_of(self.kind)

    def __str__(self) -> str:
        return f"{self.flag} {self.text!r}"

    @property
    def features(self) -> tuple[str, ...]:
        """require: the features named; min_measured: its one feature."""
        if self.kind == REQUIRE:
            return tuple(p.strip() for p in self.text.split(",") if p.strip())
        if self.kind == MIN_MEASURED:
            return (self.text.split("=", 1)[0].strip(),)
        return ()

    @property
    def fraction(self) -> float:
        return float(self.text.split("=", 1)[1])

    def to_json(self) -> dict:
        return {"kind": self.kind, "text": self.text}


def parse_criterion(kind: str, text) -> Criterion:
    """A criterion's own form (not yet checked against a table or a spec)."""
    kind = str(kind).strip().replace("-", "_")
    if kind not in KINDS:
        raise CohortError(f"unknown criterion kind {kind!r} (expected one of {', '.join(KINDS)})")
    c = Criterion(kind, str(text))
    if not c.text.strip():
        raise CohortError(f"{c}: empty criterion")
    if kind == REQUIRE and not c.features:
        raise CohortError(f"{c}: expected feature names, e.g. {EXAMPLES[REQUIRE][0]}")
    if kind == MIN_MEASURED:
        if "=" not in c.text:
            raise CohortError(f"{c}: expected FEATURE=FRACTION, e.g. {EXAMPLES[MIN_MEASURED][0]}")
        try:
            value = c.fraction
        except ValueError:
            raise CohortError(f"{c}: the fraction {c.text.split('=', 1)[1].strip()!r} is not a number") from None
        if not 0 <= value <= 1:
            raise CohortError(f"{c}: the fraction {value:g} is outside [0, 1]")
    return c


def parse_criteria(value) -> tuple[Criterion, ...]:
    """Criteria from a config file's `cohort:` list ([{include: "age >= 18"},
    {require: "BP_MAP"}, ...]), from [kind, text] pairs (the flags), from
    Criterion objects, or from that list as JSON text (a hyperparameter)."""
    if isinstance(value, str):
        import json
        try:
            value = json.loads(value) if value.strip() else []
        except ValueError:
            raise CohortError("expected a list of {kind: text} entries, e.g. "
                              '[{"include": "age >= 18"}, {"require": "BP_MAP"}]') from None
    if isinstance(value, Mapping):
        value = [{k: v} for k, v in value.items()]
    out = []
    for item in value or ():
        if isinstance(item, Criterion):
            out.append(item)
        elif isinstance(item, Mapping) and {"kind", "text"} <= set(item):  # the metadata's rows carry more
            out.append(parse_criterion(item["kind"], item["text"]))
        elif isinstance(item, Mapping) and len(item) == 1:
            (kind, text), = item.items()
            out.append(parse_criterion(kind, text))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            out.append(parse_criterion(*item))
        else:
            raise CohortError(f"cohort entry {item!r}: expected one 'kind: text' pair, kind one of {', '.join(KINDS)}")
    return tuple(out)


def dump_criteria(criteria: Iterable[Criterion]) -> list[dict]:
    """The config file's form: [{kind: text}, ...] (parse_criteria reads it back)."""
    return [{c.kind: c.text} for c in criteria]


def ordered(criteria: Iterable[Criterion]) -> tuple[Criterion, ...]:
    """Evaluation order: clinical criteria as given, then require, then
    min_measured (a stable sort); a criterion given twice counts once."""
    return tuple(sorted(dict.fromkeys(criteria), key=lambda c: _STAGE[c.kind]))


# ---- checks before any work --------------------------------------------------------

_UNDEFINED = re.compile(r"name '([^']+)' is not defined")


def evaluate(frame: pd.DataFrame, c: Criterion) -> pd.Series:
    """The clinical criterion's truth for every row of `frame` (NaN -> False);
    CohortError names the criterion, and for an unknown column the closest
    column names."""
    try:
        result = frame.eval(c.text, engine="python")
    except pd.errors.UndefinedVariableError as e:
        m = _UNDEFINED.search(str(e))
        name = m.group(1) if m else str(e)
        close = difflib.get_close_matches(name, [str(col) for col in frame.columns], n=3, cutoff=0.5)
        hint = f"; closest columns: {', '.join(close)}" if close else ""
        raise CohortError(f"{c}: the clinical table has no column {name!r}{hint}") from None
    except SyntaxError as e:
        raise CohortError(f"{c}: not a valid expression ({e.msg})") from None
    except Exception as e:  # a type error inside the expression, a bad method, ...
        raise CohortError(f"{c}: cannot be evaluated on the clinical table ({type(e).__name__}: {e})") from None
    if isinstance(result, (bool, np.bool_)):
        return pd.Series(bool(result), index=frame.index)
    if not isinstance(result, pd.Series) or not (pd.api.types.is_bool_dtype(result.dtype) or _all_bool(result)):
        kind = getattr(result, "dtype", type(result).__name__)
        raise CohortError(f"{c}: is not a true/false condition (it gives {kind} values)")
    return result.fillna(False).astype(bool)


def _all_bool(s: pd.Series) -> bool:
    return s.dtype == object and all(isinstance(v, (bool, np.bool_)) or v is None for v in s)


def check(criteria: Iterable[Criterion], frame: pd.DataFrame, fs: spec.FeatureSpec) -> None:
    """Refuses, naming the criterion: an expression over an unknown column, a
    syntax error, one that is not boolean; an unknown feature."""
    names = fs.feature_names
    for c in criteria:
        if c.kind in CLINICAL_KINDS:
            evaluate(frame, c)
            continue
        for f in c.features:
            if f not in names:
                close = difflib.get_close_matches(f, names, n=3, cutoff=0.4)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise CohortError(f"{c}: unknown feature {f!r}{hint} (features: {', '.join(names)})")


# ---- decisions ---------------------------------------------------------------------

@dataclass(frozen=True)
class Exclusion:
    """Why one case is out: the first criterion it failed (its position in
    the ordered criteria), with the measured share for min_measured and the
    case's source tracks where they were read from its file."""

    case_id: int
    kind: str
    text: str
    measured: Optional[float] = None
    tracks: Optional[tuple[str, ...]] = None

    def to_json(self) -> dict:
        d = {"case_id": int(self.case_id), "kind": self.kind, "text": self.text}
        if self.measured is not None:
            d["measured"] = self.measured
        if self.tracks is not None:
            d["tracks"] = list(self.tracks)
        return d

    @staticmethod
    def from_json(d: Mapping) -> "Exclusion":
        tracks = d.get("tracks")
        return Exclusion(int(d["case_id"]), str(d["kind"]), str(d["text"]), d.get("measured"),
                         tuple(tracks) if tracks is not None else None)

    @property
    def criterion(self) -> Criterion:
        return Criterion(self.kind, self.text)


def clinical_exclusions(case_ids: Iterable[int], criteria: Iterable[Criterion], frame: pd.DataFrame,
                        untrusted: Iterable[int] = ()) -> dict[int, Exclusion]:
    """The cases the clinical criteria leave out, each at the first it fails.
    `frame` holds one row per case (column caseid); a case without a row
    fails every include and no exclude. `untrusted` cases (two different
    rows) are not judged here: they fail as duplicate_clinical_row."""
    ids = [int(c) for c in case_ids]
    skip = set(untrusted)
    left = [c for c in ids if c not in skip]
    out: dict[int, Exclusion] = {}
    by_case = frame.set_index("caseid", drop=False) if len(frame) else frame
    for c in criteria:
        if c.kind not in CLINICAL_KINDS:
            continue
        truth = evaluate(by_case, c) if len(by_case) else pd.Series(dtype=bool)
        true_ids = set(int(i) for i in truth.index[truth.to_numpy()]) if len(truth) else set()
        fails = [i for i in left if (i not in true_ids) == (c.kind == INCLUDE)]
        for i in fails:
            out[i] = Exclusion(i, c.kind, c.text)
        failed = set(fails)
        left = [i for i in left if i not in failed]
    return out


def require_tracks(c: Criterion, fs: spec.FeatureSpec) -> list[tuple[str, frozenset]]:
    """Each required feature with the set of its source tracks."""
    return [(f, frozenset(s.track for s in fs.feature(f).sources)) for f in c.features]


def first_missing_requirement(tracks: Iterable[str], criteria: Iterable[Criterion],
                              fs: spec.FeatureSpec) -> Optional[Criterion]:
    """The first require criterion that a case with these tracks fails, or None."""
    have = set(tracks)
    for c in criteria:
        if c.kind == REQUIRE and any(not (srcs & have) for _, srcs in require_tracks(c, fs)):
            return c
    return None


def cases_with_any(track_table: pd.DataFrame, tracks: frozenset) -> set[int]:
    """The cases of a track table (caseid, tname) that have one of `tracks`."""
    hit = track_table["tname"].isin(tracks).to_numpy()
    return set(np.unique(track_table["caseid"].to_numpy()[hit]).tolist())


def table_require_exclusions(case_ids: Iterable[int], criteria: Iterable[Criterion], track_table: pd.DataFrame,
                             fs: spec.FeatureSpec) -> dict[int, Exclusion]:
    """The require criteria decided from a track table, vectorised: per
    criterion, the cases lacking a source track of one of its features. A
    case the table does not list at all is not decided here (its own file is)."""
    listed = set(np.unique(track_table["caseid"].to_numpy()).tolist())
    left = [int(c) for c in case_ids if int(c) in listed]
    out: dict[int, Exclusion] = {}
    for c in criteria:
        if c.kind != REQUIRE:
            continue
        ok = None
        for _, srcs in require_tracks(c, fs):
            have = cases_with_any(track_table, srcs)
            ok = have if ok is None else ok & have
        fails = [i for i in left if i not in ok]
        out.update((i, Exclusion(i, c.kind, c.text)) for i in fails)
        failed = set(fails)
        left = [i for i in left if i not in failed]
    return out


def measured_shares(stats: Optional[CaseStats], fs: spec.FeatureSpec) -> dict[str, float]:
    """Per feature, the share of the used seconds with a measured value,
    from a case's per-rule counts (transforms.per_case.case_stats; None: none)."""
    from transforms.features import MEASURED
    seconds = stats.seconds if stats else 0
    rules = stats.rules if stats else []
    return {f.name: (round(rules[j][MEASURED] / seconds, 6) if seconds and j < len(rules) else 0.0)
            for j, f in enumerate(fs.timeseries)}


def first_unmet_share(shares: Mapping[str, float], criteria: Iterable[Criterion]) -> Optional[Exclusion]:
    """The first min_measured criterion that these shares fail (as an
    Exclusion without a case id), or None."""
    for c in criteria:
        if c.kind == MIN_MEASURED:
            share = float(shares.get(c.features[0], 0.0))
            if share < c.fraction:
                return Exclusion(0, c.kind, c.text, measured=share)
    return None


@dataclass(frozen=True)
class FlowStep:
    """One criterion in the flow: the requested cases it took out (those an
    earlier criterion took out are not counted again); for min_measured
    each one's measured share, {case id: share}."""

    kind: str
    text: str
    excluded: tuple[int, ...]
    measured: Optional[dict] = None

    def as_json(self) -> dict:
        d = {"kind": self.kind, "text": self.text, "excluded": list(self.excluded)}
        if self.measured is not None:
            d["measured"] = {str(i): v for i, v in self.measured.items()}
        return d


@dataclass(frozen=True)
class Flow:
    """requested -> each criterion (which cases it took out) -> selected."""

    requested: int
    steps: tuple[FlowStep, ...]
    selected: int

    def as_json(self) -> dict:
        return {"requested": self.requested, "criteria": [s.as_json() for s in self.steps],
                "selected": self.selected}


def flow(requested: list[int], criteria: Iterable[Criterion], exclusions: Mapping[int, Exclusion]) -> Flow:
    """The flow of the requested cases through the criteria, in order."""
    req = set(requested)
    steps = []
    for c in criteria:
        out = tuple(sorted(i for i, e in exclusions.items() if i in req and e.criterion == c))
        measured = {i: exclusions[i].measured for i in out} if c.kind == MIN_MEASURED else None
        steps.append(FlowStep(c.kind, c.text, out, measured))
    return Flow(len(requested), tuple(steps), len(requested) - sum(len(s.excluded) for s in steps))
