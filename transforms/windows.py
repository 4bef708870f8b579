"""Windows with next-step targets, and the split of a case."""
from __future__ import annotations

import hashlib

import numpy as np

from transforms import spec


def window_count(T: int, window: int = spec.WINDOW_S, step: int = spec.STEP_S,
                 horizon: int = spec.HORIZON_S) -> int:
    """floor((T - window - horizon) / step) + 1 when the first target exists, else 0."""
    if T < window + horizon:
        return 0
    return (T - window - horizon) // step + 1


def make_windows(norm: np.ndarray, window: int = spec.WINDOW_S, step: int = spec.STEP_S,
                 horizon: int = spec.HORIZON_S) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut (T, F) normalised series into windows.

    Returns starts (n,), timeseries (n, window * F) row-major (time, feature),
    and targets (n, 8): the target features at second start + window - 1 + horizon.
    """
    n = window_count(norm.shape[0], window, step, horizon)
    starts = np.arange(n, dtype=np.int64) * step
    F = norm.shape[1]
    if n == 0:
        return starts, np.empty((0, window * F), norm.dtype), np.empty((0, spec.N_TARGETS), norm.dtype)
    view = np.lib.stride_tricks.sliding_window_view(norm, window, axis=0)[::step][:n]  # (n, F, window)
    timeseries = np.ascontiguousarray(view.transpose(0, 2, 1)).reshape(n, window * F)
    targets = norm[starts + window - 1 + horizon][:, spec.TARGET_INDEX]
    return starts, timeseries, targets


def split_bucket(case_id: int, seed: int = spec.SPLIT_SEED) -> int:
    digest = hashlib.sha256(f"{seed}:{int(case_id)}".encode()).hexdigest()
    return int(digest, 16) % 100


def assign_split(case_id: int, percent: tuple[int, ...] = spec.SPLIT_PERCENT,
                 seed: int = spec.SPLIT_SEED, names: tuple[str, ...] = spec.SPLIT_NAMES) -> str:
    """The split of a case: by case, never by window; stable on every host and rerun."""
    bucket = split_bucket(case_id, seed)
    edge = 0
    for name, pct in zip(names, percent):
        edge += pct
        if bucket < edge:
            return name
    return names[-1]


def parse_split(text: str) -> tuple[int, int, int]:
    parts = [p.strip() for p in str(text).split(",")]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--split {text!r}: expected three integers like 70,15,15") from None
    if len(vals) != 3 or any(v < 0 for v in vals) or sum(vals) != 100:
        raise ValueError(f"--split {text!r}: expected three non-negative percentages summing to 100")
    return vals  # type: ignore[return-value]
