"""Per-case pure functions on numpy arrays: body size, static features,
source selection with unit conversion, artifact removal, smart forward fill,
normalisation and its public inverse. No Python loop over seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from transforms import spec

# Imputation rule of each second (the quality report counts these).
MEASURED, CARRIED, BEFORE, AFTER_CARRIED, AFTER_DEFAULT, CLINICAL_ZERO, ABSENT = range(7)
RULE_NAMES = ("measured", "carried", "before_default", "after_carried", "after_default",
              "clinical_zero", "no_data_default")


def _number(value) -> Optional[float]:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _blank(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _sex(value) -> Optional[str]:
    s = str(value).strip().upper() if not _blank(value) else ""
    return s if s in spec.SEX_CODES else None


@dataclass(frozen=True)
class ClinicalValues:
    """A clinical row read against the contract (1.1): each static column's
    value if it is present and plausible, else None; and the entry errors,
    {column: the value as entered}, which are treated exactly as missing."""

    values: dict  # static name -> float, or 'M'/'F' for sex, or None
    implausible: dict = field(default_factory=dict)
    bmi_derived: bool = False

    def get(self, name: str):
        return self.values.get(name)


def clean_clinical(row: Optional[Mapping]) -> ClinicalValues:
    """Plausible values of a clinical row; implausible and non-numeric entries
    become missing and are listed (a blank cell is missing, not an error)."""
    row = row or {}
    values: dict = {}
    implausible: dict = {}
    for st in spec.STATIC:
        raw = row.get(st.column)
        if st.norm is None:  # sex
            values[st.name] = _sex(raw)
            if values[st.name] is None and not _blank(raw):
                implausible[st.column] = raw
            continue
        v = _number(raw)
        lo, hi = st.plausible
        if v is not None and lo <= v <= hi:
            values[st.name] = v
        else:
            values[st.name] = None
            if not _blank(raw):
                implausible[st.column] = raw
    derived = False
    if values["bmi"] is None and values["weight"] is not None and values["height"] is not None:
        bmi = values["weight"] / (values["height"] / 100.0) ** 2
        lo, hi = spec.STATIC_BY_NAME["bmi"].plausible
        if lo <= bmi <= hi:
            values["bmi"], derived = bmi, True
        else:
            implausible["bmi (from weight and height)"] = round(bmi, 2)
    return ClinicalValues(values, implausible, derived)


def _clinical(row) -> ClinicalValues:
    return row if isinstance(row, ClinicalValues) else clean_clinical(row)


def dose_weight(row) -> tuple[float, bool]:
    """Weight (kg) for dose conversion and whether the 70 kg default was used
    (no weight, or an implausible one)."""
    w = _clinical(row).get("weight")
    if w is not None:
        return w, False
    return spec.DEFAULT_DOSE_WEIGHT_KG, True


def ideal_body_weight(height_cm, sex) -> float:
    """Devine IBW in kg, clamped; missing (or implausible) height 170 cm, missing sex F."""
    h = _number(height_cm)
    lo, hi = spec.STATIC_BY_NAME["height"].plausible
    h = h if h is not None and lo <= h <= hi else spec.DEFAULT_HEIGHT_CM
    s = _sex(sex) or "F"
    ibw = spec.IBW_BASE_KG[s] + spec.IBW_KG_PER_CM * (h - spec.IBW_REF_CM)
    return float(np.clip(ibw, *spec.IBW_CLAMP_KG))


def normalise(values: np.ndarray, lo, hi) -> np.ndarray:
    """(v - lo) / (hi - lo) * 2 - 1, clipped to [-1, 1]. Broadcasts lo/hi."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    return np.clip((np.asarray(values, dtype=np.float64) - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0)


def denormalise(norm: np.ndarray, lo, hi) -> np.ndarray:
    """Inverse of `normalise` (inside the range): v = lo + (norm + 1) * (hi - lo) / 2."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    return lo + (np.asarray(norm, dtype=np.float64) + 1.0) * (hi - lo) / 2.0


def denormalise_feature(norm: np.ndarray, name: str, fs: spec.FeatureSpec = spec.DEFAULT_SPEC) -> np.ndarray:
    """De-normalise a time-series or target feature by its name."""
    return denormalise(norm, *fs.feature(name).norm)


def static_features(row) -> tuple[np.ndarray, list[str]]:
    """The 6 normalised static features and the names that fell back to
    defaults (missing or implausible; a bmi derived from weight and height
    is not a default). `row`: a clinical row (mapping) or ClinicalValues."""
    cv = _clinical(row)
    out = np.empty(spec.N_STATIC, dtype=np.float32)
    defaulted: list[str] = []
    for i, st in enumerate(spec.STATIC):
        v = cv.get(st.name)
        if v is None:
            defaulted.append(st.name)
        if st.norm is None:
            out[i] = spec.SEX_CODES[v] if v is not None else st.default
        else:
            out[i] = normalise(st.default if v is None else v, *st.norm)
    return out, defaulted


def select_sources(raw: np.ndarray, weight_kg: float, ibw_kg: float,
                   fs: spec.FeatureSpec = spec.DEFAULT_SPEC) -> tuple[np.ndarray, np.ndarray]:
    """Raw tracks (T, len(fs.source_tracks)) -> features (T, F) in feature units.

    Per feature and second, the first source with a plausible value wins;
    implausible raw values are missing. Returns the values (NaN = missing) and
    the index of the winning source per second (-1 = none).
    """
    T = raw.shape[0]
    per = {spec.PER_NONE: 1.0, spec.PER_WEIGHT: weight_kg, spec.PER_IBW: ibw_kg}
    column = {t: i for i, t in enumerate(fs.source_tracks)}
    # Feature-major (F, T) arrays: every track and feature series is
    # contiguous (half the time of working on the columns of (T, F)).
    tracks = np.ascontiguousarray(raw.T)
    values = np.full((fs.n_features, T), np.nan, dtype=np.float64)
    source = np.full((fs.n_features, T), -1, dtype=np.int8)
    for j, feat in enumerate(fs.timeseries):
        # Last source first, so earlier sources overwrite: first source wins.
        for k in range(len(feat.sources) - 1, -1, -1):
            src = feat.sources[k]
            lo, hi = src.plausible_for(feat)
            col = tracks[column[src.track]]
            ok = (col >= lo) & (col <= hi)  # NaN compares False
            np.multiply(col, src.factor / per[src.per], out=values[j], where=ok)
            source[j][ok] = k
    return values.T, source.T  # (T, F) views of the feature-major arrays


def impute(x: np.ndarray, feat: spec.Feature) -> tuple[np.ndarray, np.ndarray]:
    """Smart forward fill of one feature's series (NaN = missing).

    Returns the filled series and the rule used for each second
    (MEASURED, CARRIED, BEFORE, AFTER_CARRIED, AFTER_DEFAULT, CLINICAL_ZERO, ABSENT).
    """
    T = x.shape[0]
    valid = ~np.isnan(x)
    out = np.empty(T, dtype=np.float64)
    rule = np.empty(T, dtype=np.int8)
    if not valid.any():
        out.fill(feat.before)
        rule.fill(ABSENT)
        return out, rule
    t = np.arange(T)
    first = int(np.argmax(valid))
    last = T - 1 - int(np.argmax(valid[::-1]))
    prev = np.maximum.accumulate(np.where(valid, t, -1))  # last valid index at or before t
    out[:] = x[np.maximum(prev, 0)]
    rule[:] = CARRIED
    rule[valid] = MEASURED
    if feat.max_gap_s is not None:
        # Length of the gap each missing second sits in: next valid - prev valid - 1.
        nxt = np.minimum.accumulate(np.where(valid, t, T)[::-1])[::-1]
        long_gap = (~valid) & ((nxt - prev - 1) > feat.max_gap_s) & (t > first) & (t < last)
        out[long_gap] = 0.0
        rule[long_gap] = CLINICAL_ZERO
    out[:first] = feat.before
    rule[:first] = BEFORE
    after = t > last
    stale = after & (t - last > feat.after_carry_s)
    rule[after] = AFTER_CARRIED
    out[stale] = feat.after
    rule[stale] = AFTER_DEFAULT
    return out, rule


SINCE_MEASURED_CAP_S = 600


def since_measured(measured: np.ndarray, cap_s: int = SINCE_MEASURED_CAP_S) -> np.ndarray:
    """(T, F) bool measured -> float32 (T, F): seconds since the feature's last
    plausible measured value (0 at a measured second), capped at `cap_s`,
    divided by `cap_s`; 1.0 also when nothing was measured before."""
    T = measured.shape[0]
    t = np.arange(T)[:, None]
    last = np.maximum.accumulate(np.where(measured, t, -1), axis=0)
    delta = np.where(last >= 0, t - last, cap_s)
    return (np.minimum(delta, cap_s) / cap_s).astype(np.float32)


def impute_all(values: np.ndarray, fs: spec.FeatureSpec = spec.DEFAULT_SPEC) -> tuple[np.ndarray, np.ndarray]:
    """Impute every feature column of (T, F) values; returns (filled, rules)."""
    filled = np.empty_like(values)
    rules = np.empty(values.shape, dtype=np.int8)
    for j, feat in enumerate(fs.timeseries):
        filled[:, j], rules[:, j] = impute(values[:, j], feat)
    return filled, rules


def normalise_timeseries(filled: np.ndarray, fs: spec.FeatureSpec = spec.DEFAULT_SPEC) -> np.ndarray:
    """(T, F) clinical values -> float32 normalised to [-1, 1]."""
    # Row-major (time, feature) float32, the layout windows are cut from.
    return normalise(filled, fs.norm_lo, fs.norm_hi).astype(np.float32, order="C")
