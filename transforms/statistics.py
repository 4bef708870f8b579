"""Statistics of the values an output holds, per split and per feature:
computed per case in stage 1 (`case_columns`, kept in the case's marker)
and summed in finalize (`Accumulator`), never by reading the output again.

Over the values as the examples hold them, in clinical units (de-normalised:
a value outside a feature's normalisation range is at its bound, as in the
examples): every second of every window counts (a second in ten windows
counts ten times), every target and static vector once per window. "all"
counts every value, "measured" only those that were measured (a plausible
recorded value in that second; for a target its second; for a static
feature a clinical value that was not defaulted). Per column: count, mean,
standard deviation, min, max (exact: counts and moments merge exactly), and
quantiles from a histogram of STAT_BINS bins over the feature's range
(quantiles do not merge exactly: the estimate is within one bin width,
`resolution`, of the exact one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

STAT_BINS = 500
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


@dataclass(frozen=True, slots=True)
class ColumnStats:
    """One column's statistics in one case (case_columns): every part merges
    exactly. JSON (a case's marker): the list [count, total, total_sq, vmin,
    vmax, bins, counts]."""

    count: int  # values counted (each with its weight)
    total: float  # their weighted sum
    total_sq: float  # and sum of squares
    vmin: Optional[float]  # None where count is 0
    vmax: Optional[float]
    bins: list[int]  # the nonzero histogram bins (of STAT_BINS), ascending
    counts: list[int]  # their counts

    def to_json(self) -> list:
        return [self.count, self.total, self.total_sq, self.vmin, self.vmax, self.bins, self.counts]

    @staticmethod
    def from_json(c: Sequence) -> "ColumnStats":
        n, s1, s2, vmin, vmax, bins, counts = c
        return ColumnStats(n, s1, s2, vmin, vmax, bins, counts)


def bins_of(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Each value's histogram bin, offset by its row's (C, n): STAT_BINS bins
    over [lo, hi] per row, row j's bins at j * STAT_BINS."""
    bins = ((values - lo[:, None]) * (STAT_BINS / (hi - lo))[:, None]).astype(np.int64)
    np.clip(bins, 0, STAT_BINS - 1, out=bins)
    bins += (np.arange(values.shape[0]) * STAT_BINS)[:, None]
    return bins


def case_columns(values: np.ndarray, row_weight: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 mask: Optional[np.ndarray] = None, bins: Optional[np.ndarray] = None) -> list[ColumnStats]:
    """Per column (a row of `values`, (C, n): one feature's values in
    clinical units), each value counted `row_weight` (n,) times (how often it
    occurs in the examples), only where `mask` (C, n) is true if given.
    Returns per column its ColumnStats (count, sum, sum of squares, min,
    max, nonzero histogram bins, their counts).

    Most values have one weight (a second is in window/step windows away
    from a case's ends): the histogram counts every value once at that
    weight and corrects the few others, which is 4x cheaper than counting
    every value with its own weight (measured, a 4-hour case)."""
    n_cols = values.shape[0]
    if bins is None:
        bins = bins_of(values, lo, hi)
    w = row_weight.astype(np.float64)
    common = int(np.bincount(row_weight).argmax())
    odd = np.flatnonzero(row_weight != common)
    odd_w = np.broadcast_to(w[odd] - common, (n_cols, len(odd)))
    covered = row_weight > 0
    end = int(covered.sum())
    span = slice(0, end) if covered[:end].all() else covered  # the seconds in windows (a prefix, normally)
    if mask is None:
        count = np.full(n_cols, w.sum())
        s1 = values @ w
        s2 = (values * values) @ w
        vmin, vmax = values[:, span].min(axis=1, initial=np.inf), values[:, span].max(axis=1, initial=-np.inf)
        hist = common * np.bincount(bins.ravel(), minlength=n_cols * STAT_BINS)
        hist = hist + np.bincount(bins[:, odd].ravel(), weights=odd_w.ravel(), minlength=n_cols * STAT_BINS)
    else:
        mask = mask & covered
        masked = mask * values
        count = mask @ w
        s1 = masked @ w
        s2 = (masked * values) @ w
        vmin = np.where(mask, values, np.inf).min(axis=1, initial=np.inf)
        vmax = np.where(mask, values, -np.inf).max(axis=1, initial=-np.inf)
        odd_mask = mask[:, odd]
        hist = common * np.bincount(bins[mask], minlength=n_cols * STAT_BINS)
        hist = hist + np.bincount(bins[:, odd][odd_mask], weights=odd_w[odd_mask], minlength=n_cols * STAT_BINS)
    hist = np.rint(hist).astype(np.int64).reshape(n_cols, STAT_BINS)
    out = []
    for j in range(n_cols):
        if count[j] == 0:
            out.append(ColumnStats(0, 0.0, 0.0, None, None, [], []))
            continue
        idx = np.flatnonzero(hist[j])
        out.append(ColumnStats(int(count[j]), float(s1[j]), float(s2[j]), float(vmin[j]), float(vmax[j]),
                               idx.tolist(), hist[j, idx].tolist()))
    return out


class Accumulator:
    """Per-case column stats (case_columns) of one group (C columns) summed:
    counts and moments exactly, histograms bin by bin."""

    def __init__(self, n_cols: int):
        self.count = np.zeros(n_cols, np.int64)
        self.s1 = np.zeros(n_cols)
        self.s2 = np.zeros(n_cols)
        self.vmin = np.full(n_cols, np.inf)
        self.vmax = np.full(n_cols, -np.inf)
        self.hist = np.zeros((n_cols, STAT_BINS), np.int64)

    def add(self, columns: Sequence[ColumnStats]) -> None:
        for j, c in enumerate(columns):
            if c.count == 0:
                continue
            self.count[j] += c.count
            self.s1[j] += c.total
            self.s2[j] += c.total_sq
            self.vmin[j] = min(self.vmin[j], c.vmin)
            self.vmax[j] = max(self.vmax[j], c.vmax)
            np.add.at(self.hist[j], c.bins, c.counts)

    def summary(self, j: int, lo: float, hi: float) -> dict:
        """count, mean, std (population), min, max and QUANTILES of column j;
        a quantile is where the histogram's cumulative count reaches it,
        interpolated within its bin: within one bin width, (hi - lo) /
        STAT_BINS, of the exact (inverted-CDF) quantile."""
        n = int(self.count[j])
        if n == 0:
            return {"count": 0}
        mean = self.s1[j] / n
        var = max(self.s2[j] / n - mean * mean, 0.0)
        width = (hi - lo) / STAT_BINS
        cdf = np.cumsum(self.hist[j])
        quantiles = {}
        for q in QUANTILES:
            k = min(int(np.searchsorted(cdf, q * n)), STAT_BINS - 1)  # the first bin reaching q * n
            before = cdf[k - 1] if k else 0
            frac = min(max((q * n - before) / self.hist[j, k], 0.0), 1.0) if self.hist[j, k] else 0.0
            est = lo + (k + frac) * width
            quantiles[f"{q:g}"] = float(min(max(est, self.vmin[j]), self.vmax[j]))
        return {"count": n, "mean": float(mean), "std": float(np.sqrt(var)), "min": float(self.vmin[j]),
                "max": float(self.vmax[j]), "quantiles": quantiles}


def downsample(col: ColumnStats, bins: int) -> np.ndarray:
    """A column's histogram in `bins` coarser bins (STAT_BINS a multiple of it)."""
    out = np.zeros(bins, np.int64)
    np.add.at(out, np.asarray(col.bins, np.int64) // (STAT_BINS // bins), np.asarray(col.counts, np.int64))
    return out
