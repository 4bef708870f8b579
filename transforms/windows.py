"""Windows with next-step targets, and the split of a case."""
from __future__ import annotations

import hashlib
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
