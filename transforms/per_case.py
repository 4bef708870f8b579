"""One case from raw tracks to windows: the pure per-case pipeline.

raw tracks (T, tracks) + clinical row -> features in clinical units ->
smart forward fill -> normalised (T, F) -> windows + targets, plus the
per-case facts and statistics the quality report and metadata are built from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from transforms import encode, features, spec, statistics, windows
from transforms.settings import Settings
from transforms.statistics import ColumnStats

# The value statistics' groups and kinds (value_stats), in their JSON order.
VALUE_GROUPS = ("timeseries", "targets", "static")
VALUE_KINDS = ("all", "measured")


@dataclass(frozen=True)
class GroupStats:
    """One group's columns (a ColumnStats per feature, target or static
    feature): of all its values, and of the measured ones."""

    all: list[ColumnStats]
    measured: list[ColumnStats]

    def to_json(self) -> dict:
        return {"all": [c.to_json() for c in self.all], "measured": [c.to_json() for c in self.measured]}

    @staticmethod
    def from_json(d: Mapping) -> "GroupStats":
        column = ColumnStats.from_json
        return GroupStats([column(c) for c in d["all"]], [column(c) for c in d["measured"]])


@dataclass(frozen=True)
class ValueStats:
    """The statistics of the values a case's examples hold (value_stats), per
    group; JSON: {group: {kind: [column, ...]}}."""

    timeseries: GroupStats
    targets: GroupStats
    static: GroupStats

    def columns(self, group: str, kind: str) -> list[ColumnStats]:
        """The columns of one group (VALUE_GROUPS) and kind (VALUE_KINDS)."""
        return getattr(getattr(self, group), kind)

    def to_json(self) -> dict:
        return {g: getattr(self, g).to_json() for g in VALUE_GROUPS}

    @staticmethod
    def from_json(d: Mapping) -> "ValueStats":
        return ValueStats(*(GroupStats.from_json(d[g]) for g in VALUE_GROUPS))


@dataclass(frozen=True)
class CaseStats:
    """A case's per-feature counts (case_stats) and, where it has windows, the
    statistics of its values (value_stats): what the quality report, the
    metadata's statistics and the cohort's min_measured are summed from.
    JSON (the done marker's "stats"): a dict by field name, "values" only
    where there are some. The counts are lists, as the JSON holds them."""

    seconds: int = 0  # the seconds used
    rules: list[list[int]] = field(default_factory=list)  # (F, rules): seconds per rule (features.RULE_NAMES)
    sources: list[list[int]] = field(default_factory=list)  # per feature, seconds per source (its own)
    clipped: list[int] = field(default_factory=list)  # (F,): measured seconds outside the range
    imputed_outside: list[int] = field(default_factory=list)  # (F,): imputed seconds outside it
    values: Optional[ValueStats] = None  # None: no window

    def to_json(self) -> dict:
        d = {"seconds": self.seconds, "rules": self.rules, "sources": self.sources, "clipped": self.clipped,
             "imputed_outside": self.imputed_outside}
        if self.values is not None:
            d["values"] = self.values.to_json()
        return d

    @staticmethod
    def from_json(d: Mapping) -> "CaseStats":
        values = d.get("values")
        return CaseStats(int(d.get("seconds") or 0), d.get("rules") or [], d.get("sources") or [],
                         d.get("clipped") or [], d.get("imputed_outside") or [],
                         ValueStats.from_json(values) if values else None)


@dataclass
class CaseFacts:
    """What one case's transform found out, JSON-able (its statistics through
    CaseStats.to_json): the core of its done marker (which adds where the case
    came from, pipeline.io.vital.CaseOrigin), and what the metadata and quality
    report are built from."""

    case_id: int
    split: str = ""
    # What the split was hashed from (contract 1.2): "s<subjectid>" (the patient), or
    # the case id where the clinical row names no patient.
    split_key: str = ""
    windows: int = 0
    duration_s: int = 0  # recording length
    used_from_s: int = 0  # first second used (cropping)
    used_seconds: int = 0
    no_clinical_row: bool = False
    static_defaults: list = field(default_factory=list)  # static features that took their default
    # Clinical entry errors, {column: value as entered}, treated as missing: the
    # static columns' (contract 1.1) and anestart/aneend (1.3, listed with or
    # without --crop-anaesthesia: a fact of the row; not in static_defaults).
    static_implausible: dict = field(default_factory=dict)
    dose_weight_kg: float = 0.0
    dose_weight_default: bool = False
    ibw_kg: float = 0.0
    stats: Optional[CaseStats] = None  # per-feature counts and value statistics (None: an old marker's {})


@dataclass(frozen=True)
class CaseFailure:
    """A case that failed and why: the dead letter the DoFns hand on, and
    (pipeline.output.contracts.FailedMarker) what cases/_failed/<id>.json holds."""

    case_id: int
    reason: str  # missing_file, corrupt_file, no_tracks, download_failed, duplicate_clinical_row, ...
    detail: str

    def to_json(self) -> dict:
        return {"case_id": int(self.case_id), "reason": self.reason, "detail": self.detail}

    @staticmethod
    def from_json(d: Mapping) -> "CaseFailure":  # keys it does not know are ignored
        return CaseFailure(int(d["case_id"]), str(d["reason"]), str(d["detail"]))


@dataclass
class CaseWindows:
    """One case's windows, as arrays, and its facts (its split among them: facts.split)."""

    case_id: int
    starts: np.ndarray
    timeseries: np.ndarray  # (n, window*F) float32
    targets: np.ndarray  # (n, targets) float32
    static: np.ndarray  # (6,) float32
    observed: Optional[np.ndarray]  # (n, window*F) float32 or None
    facts: CaseFacts
    since_measured: Optional[np.ndarray] = None  # (n, window*F) float32 or None

    def example_floats(self) -> dict[str, np.ndarray]:
        """The float features of this case's examples, by name (encode.FLOAT_FEATURES, the schema)."""
        return {n: getattr(self, n) for n in encode.FLOAT_FEATURES if getattr(self, n) is not None}


# Contract 1.3: anestart and aneend are seconds from casestart (anestart is
# usually negative, aneend can lie past caseend: the crop clips them). A value
# outside this range (inclusive), or one that is not a number, is a clinical
# entry error and treated as missing (real case 4476: aneend = -3691470416).
ANAESTHESIA_COLUMNS = ("anestart", "aneend")
ANAESTHESIA_PLAUSIBLE_S = spec.ANAESTHESIA_PLAUSIBLE_S  # the contract's (transforms.spec)


def anaesthesia_period(row: Optional[Mapping]) -> tuple[Optional[float], Optional[float], dict]:
    """The clinical row's (anestart, aneend) in seconds from casestart, each
    None where missing or an entry error, and the entry errors, {column: the
    value as entered}. Both plausible but aneend not after anestart: both
    are entry errors (and both missing)."""
    row = row or {}
    lo, hi = ANAESTHESIA_PLAUSIBLE_S
    values: dict = {}
    errors: dict = {}
    for column in ANAESTHESIA_COLUMNS:
        raw = row.get(column)
        v = features._number(raw)
        values[column] = v if v is not None and lo <= v <= hi else None
        if values[column] is None and not features._blank(raw):
            errors[column] = raw
    start, end = values["anestart"], values["aneend"]
    if start is not None and end is not None and not end > start:
        errors = {column: row.get(column) for column in ANAESTHESIA_COLUMNS}
        start = end = None
    return start, end, errors


def crop_bounds(T: int, row: Optional[Mapping]) -> tuple[int, int]:
    """[max(0, anestart), min(T, aneend)] in whole seconds; a missing bound, or
    one that is an entry error (anaesthesia_period), is the recording's own."""
    a, b, _ = anaesthesia_period(row)
    lo = max(0, int(np.floor(a))) if a is not None else 0
    hi = min(T, int(np.ceil(b))) if b is not None else T
    return (lo, hi) if hi > lo else (0, 0)


def case_stats(filled: np.ndarray, norm: np.ndarray, rules: np.ndarray, source: np.ndarray,
               fs: spec.FeatureSpec = spec.DEFAULT_SPEC) -> CaseStats:
    """Per-feature counts for the quality report (summed over cases later):
    seconds per imputation rule, per source track (each feature's own
    sources, any number), and the seconds whose clinical value lay outside
    the normalisation range (set to -1 or +1): measured ("clipped": many
    point to a range or unit problem) and imputed ("imputed_outside": a
    clinical zero below the range, as ETCO2's 0 kPa, is no problem). The
    distribution of values is in value_stats."""
    F, R, S = fs.n_features, len(features.RULE_NAMES), fs.max_sources + 1
    col = np.arange(F)
    # One bincount per table over (value + feature * width), not a pass per value.
    rule_counts = np.bincount((rules + col * R).ravel(), minlength=F * R).reshape(F, R)
    src_counts = np.bincount((source.astype(np.int64) + 1 + col * S).ravel(), minlength=F * S).reshape(F, S)[:, 1:]
    # Outside (lo, hi): cut to -1 or +1 (a drug at 0 with lo = 0 is exactly -1, not outside).
    outside = (filled < fs.norm_lo) | (filled > fs.norm_hi)
    clipped = (outside & (rules == features.MEASURED)).sum(axis=0)
    return CaseStats(seconds=int(norm.shape[0]), rules=rule_counts.tolist(),
                     sources=[src_counts[j, :len(f.sources)].tolist() for j, f in enumerate(fs.timeseries)],
                     clipped=clipped.tolist(), imputed_outside=(outside.sum(axis=0) - clipped).tolist())


def value_stats(norm: np.ndarray, measured: np.ndarray, starts: np.ndarray, static: np.ndarray,
                static_defaults: list, settings: Settings, fs: spec.FeatureSpec = spec.DEFAULT_SPEC) -> ValueStats:
    """The case's statistics of the values its examples hold, in clinical
    units (transforms.statistics): the time series (each second once per
    window it is in), the targets and the static features (once per
    window); all values, and the measured ones. `starts` relative to `norm`."""
    n, T = len(starts), norm.shape[0]
    lo, hi, ti = fs.norm_lo, fs.norm_hi, fs.target_index
    # Feature-major (F, T), so that each feature's reductions run over one row.
    clinical = np.ascontiguousarray(norm.T)
    clinical += 1.0
    clinical *= ((hi - lo) / 2.0)[:, None]
    clinical += lo[:, None]
    meas = np.ascontiguousarray(measured.T)
    bins = statistics.bins_of(clinical, lo, hi)
    edges = np.zeros(T + 1, np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + settings.window, -1)
    per_second = np.cumsum(edges[:T])  # the windows holding each second
    rows = starts + settings.window - 1 + settings.horizon
    targets, target_meas = clinical[ti][:, rows], meas[ti][:, rows]
    once = np.ones(n, np.int64)
    s_lo, s_hi = np.array([s.span for s in spec.STATIC]).T
    static_values = (s_lo + (static.astype(np.float64) + 1.0) * ((s_hi - s_lo) / 2.0))[:, None]
    static_meas = np.array([[s.name not in static_defaults] for s in spec.STATIC])
    per_case = np.array([n])
    column = statistics.case_columns
    return ValueStats(
        timeseries=GroupStats(all=column(clinical, per_second, lo, hi, bins=bins),
                              measured=column(clinical, per_second, lo, hi, meas, bins)),
        targets=GroupStats(all=column(targets, once, lo[ti], hi[ti]),
                           measured=column(targets, once, lo[ti], hi[ti], target_meas)),
        static=GroupStats(all=column(static_values, per_case, s_lo, s_hi),
                          measured=column(static_values, per_case, s_lo, s_hi, static_meas)),
    )


def _jsonable(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def process_case(case_id: int, raw: np.ndarray, row: Optional[Mapping], settings: Settings,
                 fs: spec.FeatureSpec = spec.DEFAULT_SPEC, *, split_key: str) -> CaseWindows:
    """The whole per-case transform, pure: numpy in, numpy out. `split_key`
    is the case's (the clinical table's, pipeline.io.clinical.ClinicalTable.split_key):
    its split is the one the settings give that key."""
    if not split_key:  # a RawCase not made by LoadCase: every such case would share one split
        raise ValueError(f"case {case_id}: no split key (pipeline.io.clinical.ClinicalTable.split_key gives it)")
    cv = features.clean_clinical(row)  # entry errors are missing values from here on
    # Every entry error of the row, the anaesthesia times' too (contract 1.3), cropped or not.
    entry_errors = {k: _jsonable(v) for k, v in {**cv.implausible, **anaesthesia_period(row)[2]}.items()}
    weight, weight_default = features.dose_weight(cv)
    ibw = features.ideal_body_weight(cv.get("height"), cv.get("sex"))
    static, static_defaults = features.static_features(cv)
    T_full = raw.shape[0]
    lo, hi = crop_bounds(T_full, row) if settings.crop_anaesthesia else (0, T_full)
    raw = raw[lo:hi]
    values, source = features.select_sources(raw, weight, ibw, fs)
    filled, rules = features.impute_all(values, fs)
    norm = features.normalise_timeseries(filled, fs)
    starts, ts, targets = windows.make_windows(norm, settings.window, settings.step, settings.horizon,
                                               fs.target_index)
    measured = rules == features.MEASURED
    observed = since = None
    if settings.emit_mask:
        observed = windows.make_windows(measured.astype(np.float32), settings.window, settings.step,
                                        settings.horizon, fs.target_index)[1]
    if settings.emit_delta:
        since = windows.make_windows(features.since_measured(measured), settings.window,
                                     settings.step, settings.horizon, fs.target_index)[1]
    stats = case_stats(filled, norm, rules, source, fs)
    if len(starts):
        stats = dataclasses.replace(stats, values=value_stats(norm, measured, starts, static, static_defaults,
                                                              settings, fs))
    starts = starts + lo  # seconds from the recording start, also when cropped
    facts = CaseFacts(
        case_id=case_id, split=settings.split_of(split_key), split_key=split_key, windows=int(len(starts)),
        duration_s=int(T_full), used_from_s=int(lo), used_seconds=int(raw.shape[0]), no_clinical_row=row is None,
        static_defaults=static_defaults, static_implausible=entry_errors,
        dose_weight_kg=weight, dose_weight_default=weight_default, ibw_kg=ibw,
        stats=stats)
    return CaseWindows(case_id, starts, ts, targets.astype(np.float32), static, observed, facts, since)

