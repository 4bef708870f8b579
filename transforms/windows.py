"""Windows with next-step targets, and the split of a case (by patient)."""
from __future__ import annotations

import decimal
import hashlib
import math
import re
from typing import Optional

import numpy as np

from transforms import spec


def window_count(T: int, window: int = spec.WINDOW_S, step: int = spec.STEP_S,
                 horizon: int = spec.HORIZON_S) -> int:
    """floor((T - window - horizon) / step) + 1 when the first target exists, else 0."""
    if T < window + horizon:
        return 0
    return (T - window - horizon) // step + 1


def make_windows(norm: np.ndarray, window: int = spec.WINDOW_S, step: int = spec.STEP_S,
                 horizon: int = spec.HORIZON_S, target_index: Optional[np.ndarray] = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut (T, F) normalised series into windows.

    Returns starts (n,), timeseries (n, window * F) row-major (time, feature),
    and targets (n, len(target_index)): the target features (default: the
    built-in spec's) at second start + window - 1 + horizon.
    """
    target_index = spec.DEFAULT_SPEC.target_index if target_index is None else target_index
    n = window_count(norm.shape[0], window, step, horizon)
    starts = np.arange(n, dtype=np.int64) * step
    F = norm.shape[1]
    if n == 0:
        return starts, np.empty((0, window * F), norm.dtype), np.empty((0, len(target_index)), norm.dtype)
    view = np.lib.stride_tricks.sliding_window_view(norm, window, axis=0)[::step][:n]  # (n, F, window)
    timeseries = np.ascontiguousarray(view.transpose(0, 2, 1)).reshape(n, window * F)
    targets = norm[starts + window - 1 + horizon][:, target_index]
    return starts, timeseries, targets


def patient_id(value) -> Optional[str]:
    """A clinical `subjectid` as the split key writes it, or None if missing.

    An integral number is written in decimal without padding ("0042", "42",
    "42.0" and "4.2e1" are "42"); any other value as written, stripped. A
    blank cell (None, NaN, "") is missing."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None if math.isnan(value) else str(value)
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    if not text:
        return None
    if _DIGITS.match(text):  # exact, however long (a float would round it)
        return str(int(text))
    try:
        d = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return text
    if d.is_finite() and d == d.to_integral_value():
        return str(int(d))
    return text


_DIGITS = re.compile(r"^[+-]?\d+$")


def split_key(case_id: int, subjectid=None) -> str:
    """The key a case's split is hashed from (contract 1.2): `s<subjectid>`
    when its clinical row names the patient, else the case id in decimal."""
    patient = patient_id(subjectid)
    return f"s{patient}" if patient is not None else str(int(case_id))


def split_bucket(key, seed: int = spec.SPLIT_SEED) -> int:
    """int(sha256(f"{seed}:{key}")) % 100; an int key is a case id."""
    key = str(int(key)) if isinstance(key, (int, np.integer)) else str(key)
    digest = hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
    return int(digest, 16) % 100


def fold_names(folds: int) -> tuple[str, ...]:
    return tuple(f"fold-{i}" for i in range(1, folds + 1))


def assign_split(key, percent: tuple[int, ...] = spec.SPLIT_PERCENT,
                 seed: int = spec.SPLIT_SEED, names: tuple[str, ...] = spec.SPLIT_NAMES, folds: int = 0) -> str:
    """The split of a split key (split_key; an int is a case id): by patient,
    never by window; stable on every host and rerun. With `folds` K, the
    fold from the same bucket: fold-(floor(bucket * K / 100) + 1)."""
    bucket = split_bucket(key, seed)
    if folds:
        return f"fold-{bucket * folds // 100 + 1}"
    edge = 0
    for name, pct in zip(names, percent):
        edge += pct
        if bucket < edge:
            return name
    return names[-1]
