"""Per-case pure functions on numpy arrays: body size, static features,
source selection with unit conversion, artifact removal, smart forward fill,
normalisation and its public inverse. No Python loop over seconds.
"""
from __future__ import annotations

import math
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


def _sex(value) -> Optional[str]:
    s = str(value).strip().upper() if value is not None else ""
    return s if s in spec.SEX_CODES else None


def dose_weight(row: Mapping) -> tuple[float, bool]:
    """Weight (kg) for dose conversion and whether the 70 kg default was used."""
    w = _number(row.get("weight"))
    if w is not None and w > 0:
        return w, False
    return spec.DEFAULT_DOSE_WEIGHT_KG, True


def ideal_body_weight(height_cm, sex) -> float:
    """Devine IBW in kg, clamped; missing height 170 cm, missing sex F."""
    h = _number(height_cm)
    h = h if h is not None and h > 0 else spec.DEFAULT_HEIGHT_CM
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


def denormalise_feature(norm: np.ndarray, name: str) -> np.ndarray:
    """De-normalise a time-series or target feature by its name."""
    f = spec.TIMESERIES[spec.FEATURE_NAMES.index(name)]
    return denormalise(norm, *f.norm)


def static_features(row: Optional[Mapping]) -> tuple[np.ndarray, list[str]]:
    """The 6 normalised static features and the names that fell back to defaults."""
    row = row or {}
    raw: dict[str, float] = {}
    defaulted: list[str] = []
    for st in spec.STATIC:
        if st.norm is None:
            s = _sex(row.get(st.column))
            v = spec.SEX_CODES[s] if s else st.default
            ok = s is not None
        else:
            v = _number(row.get(st.column))
            ok = v is not None and (v > 0 or st.name == "age")
            if st.name == "bmi" and not ok:
                w, h = _number(row.get("weight")), _number(row.get("height"))
                if w and h and w > 0 and h > 0:
                    v, ok = w / (h / 100.0) ** 2, True
            if not ok:
                v = st.default
        raw[st.name] = float(v)
        if not ok:
            defaulted.append(st.name)
    out = np.empty(spec.N_STATIC, dtype=np.float32)
    for i, st in enumerate(spec.STATIC):
        out[i] = raw[st.name] if st.norm is None else normalise(raw[st.name], *st.norm)
    return out, defaulted


def select_sources(raw: np.ndarray, weight_kg: float, ibw_kg: float) -> tuple[np.ndarray, np.ndarray]:
    """Raw tracks (T, len(SOURCE_TRACKS)) -> features (T, 16) in feature units.

    Per feature and second, the first source with a plausible value wins;
    implausible raw values are missing. Returns the values (NaN = missing) and
    the index of the winning source per second (-1 = none).
    """
    T = raw.shape[0]
    per = {spec.PER_NONE: 1.0, spec.PER_WEIGHT: weight_kg, spec.PER_IBW: ibw_kg}
    # Feature-major (16, T) arrays: every track and feature series is
    # contiguous (half the time of working on the columns of (T, 16)).
    tracks = np.ascontiguousarray(raw.T)
    values = np.full((spec.N_FEATURES, T), np.nan, dtype=np.float64)
    source = np.full((spec.N_FEATURES, T), -1, dtype=np.int8)
    for j, feat in enumerate(spec.TIMESERIES):
        lo, hi = feat.plausible
        # Last source first, so earlier sources overwrite: first source wins.
        for k in range(len(feat.sources) - 1, -1, -1):
            src = feat.sources[k]
            col = tracks[spec.SOURCE_TRACKS.index(src.track)]
            ok = (col >= lo) & (col <= hi)  # NaN compares False
            np.multiply(col, src.factor / per[src.per], out=values[j], where=ok)
            source[j][ok] = k
    return values.T, source.T  # (T, 16) views of the feature-major arrays


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


def impute_all(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Impute every feature column of (T, 16) values; returns (filled, rules)."""
    filled = np.empty_like(values)
    rules = np.empty(values.shape, dtype=np.int8)
    for j, feat in enumerate(spec.TIMESERIES):
        filled[:, j], rules[:, j] = impute(values[:, j], feat)
    return filled, rules


def normalise_timeseries(filled: np.ndarray) -> np.ndarray:
    """(T, 16) clinical values -> float32 normalised to [-1, 1]."""
    # Row-major (time, feature) float32, the layout windows are cut from.
    return normalise(filled, spec.NORM_LO, spec.NORM_HI).astype(np.float32, order="C")
