"""The per-case statistics' types (transforms.statistics.ColumnStats,
transforms.per_case.CaseStats/ValueStats) and their JSON: the form the done
markers have always held (a column a positional list, the stats a dict), so
that outputs written before still read and resume, and markers written now
are the same bytes."""
import json

import numpy as np

from pipeline.output.contracts import DoneMarker
from transforms import spec, statistics
from transforms.per_case import CaseStats, ValueStats, process_case
from transforms.settings import Settings
from transforms.statistics import ColumnStats


def columns_and_inputs():
    rng = np.random.default_rng(11)
    lo, hi = np.array([0.0, -5.0, 20.0]), np.array([10.0, 5.0, 200.0])
    values = np.clip(rng.normal(3, 4, (3, 400)), lo[:, None], hi[:, None])
    weight = rng.integers(0, 4, 400)
    mask = rng.random((3, 400)) < 0.3
    mask[2] = False  # a column with nothing measured
    return values, weight, lo, hi, mask


def positional(values, weight, lo, hi, mask):
    """Today's list form of one column, [count, sum, sum_sq, min, max, bins, counts], by numpy directly."""
    out = []
    for j in range(values.shape[0]):
        w = np.where(mask[j] & (weight > 0), weight, 0).astype(np.float64)
        if w.sum() == 0:
            out.append([0, 0.0, 0.0, None, None, [], []])
            continue
        x = values[j]
        b = np.clip(((x - lo[j]) * (statistics.STAT_BINS / (hi[j] - lo[j]))).astype(np.int64), 0,
                    statistics.STAT_BINS - 1)
        hist = np.bincount(b, weights=w, minlength=statistics.STAT_BINS).astype(np.int64)
        idx = np.flatnonzero(hist)
        out.append([int(w.sum()), float(x @ w), float((x * x) @ w), float(x[w > 0].min()), float(x[w > 0].max()),
                    idx.tolist(), hist[idx].tolist()])
    return out


def test_a_column_is_written_and_read_as_the_positional_list():
    values, weight, lo, hi, mask = columns_and_inputs()
    for m in (None, mask):
        cols = statistics.case_columns(values, weight, lo, hi, m)
        assert all(isinstance(c, ColumnStats) for c in cols)
        want = positional(values, weight, lo, hi, np.ones_like(mask) if m is None else m)
        got = [c.to_json() for c in cols]
        assert [g[0] for g in got] == [w[0] for w in want] and [g[5:] for g in got] == [w[5:] for w in want]
        assert np.allclose([g[1:5] for g in got if g[0]], [w[1:5] for w in want if w[0]])
        text = json.dumps(got, separators=(",", ":"))
        back = [ColumnStats.from_json(c) for c in json.loads(text)]
        assert back == cols and json.dumps([c.to_json() for c in back], separators=(",", ":")) == text
    assert statistics.case_columns(values, weight, lo, hi, mask)[2].to_json() == [0, 0.0, 0.0, None, None, [], []]


def positional_add(acc: statistics.Accumulator, columns: list) -> None:
    """Accumulator.add as it read the positional lists before the types."""
    for j, (n, s1, s2, vmin, vmax, idx, counts) in enumerate(columns):
        if n == 0:
            continue
        acc.count[j] += n
        acc.s1[j] += s1
        acc.s2[j] += s2
        acc.vmin[j] = min(acc.vmin[j], vmin)
        acc.vmax[j] = max(acc.vmax[j], vmax)
        np.add.at(acc.hist[j], idx, counts)


def test_the_accumulator_sums_the_types_as_it_summed_the_lists():
    values, weight, lo, hi, mask = columns_and_inputs()
    typed, lists = statistics.Accumulator(3), statistics.Accumulator(3)
    for part in (slice(0, 150), slice(150, 151), slice(151, 400)):
        for m in (None, mask[:, part]):
            cols = statistics.case_columns(values[:, part], weight[part], lo, hi, m)
            typed.add(cols)
            positional_add(lists, [c.to_json() for c in cols])
    for j in range(3):
        assert typed.summary(j, lo[j], hi[j]) == lists.summary(j, lo[j], hi[j])
        col = statistics.case_columns(values, weight, lo, hi)[j]
        old = np.zeros(20, np.int64)
        np.add.at(old, np.asarray(col.to_json()[5]) // (statistics.STAT_BINS // 20), np.asarray(col.to_json()[6]))
        assert statistics.downsample(col, 20).tolist() == old.tolist()


def one_case(T: int):
    fs = spec.DEFAULT_SPEC
    raw = np.full((T, len(fs.source_tracks)), np.nan)
    raw[::2, fs.source_tracks.index("Solar8000/HR")] = 70.0 + np.arange(0, T, 2) % 13
    raw[::3, fs.source_tracks.index("Solar8000/ART_MBP")] = 85.0
    return process_case(1, raw, {"weight": 70, "subjectid": 5, "asa": 2}, Settings(), split_key="s5")


def test_the_case_stats_json_is_todays_dict_and_reads_back():
    stats = one_case(900).facts.stats
    assert isinstance(stats, CaseStats) and isinstance(stats.values, ValueStats)
    d = stats.to_json()
    assert list(d) == ["seconds", "rules", "sources", "clipped", "imputed_outside", "values"]
    assert d["seconds"] == 900 and d["rules"] == stats.rules and d["clipped"] == stats.clipped
    assert list(d["values"]) == ["timeseries", "targets", "static"]
    assert all(list(g) == ["all", "measured"] for g in d["values"].values())
    assert d["values"]["targets"]["measured"] == [c.to_json() for c in stats.values.targets.measured]
    assert stats.values.columns("static", "all") is stats.values.static.all
    assert len(d["values"]["timeseries"]["all"]) == spec.DEFAULT_SPEC.n_features
    text = json.dumps(d, separators=(",", ":"))
    assert CaseStats.from_json(json.loads(text)) == stats
    assert json.dumps(CaseStats.from_json(json.loads(text)).to_json(), separators=(",", ":")) == text
    short = one_case(200).facts.stats  # too short for a window: no values
    assert short.values is None and "values" not in short.to_json()
    assert CaseStats.from_json(short.to_json()) == short


def test_a_done_marker_converts_its_stats_at_the_edge():
    facts = one_case(900).facts
    marker = DoneMarker(**vars(facts), status="ok", host="h", worker=1)
    d = marker.to_json()
    assert d["stats"] == facts.stats.to_json() and isinstance(d["stats"], dict)
    text = json.dumps(d, separators=(",", ":"))
    back = DoneMarker.from_json(json.loads(text))
    assert back == marker and isinstance(back.stats, CaseStats)
    assert json.dumps(back.to_json(), separators=(",", ":")) == text
    # a marker without stats (written as {}), or without the key at all, or without values, still reads
    bare = DoneMarker(case_id=3)
    assert bare.stats is None and bare.to_json()["stats"] == {}
    assert DoneMarker.from_json(bare.to_json()) == bare and DoneMarker.from_json({"case_id": 3}).stats is None
    no_values = dict(d, stats={k: v for k, v in d["stats"].items() if k != "values"})
    read = DoneMarker.from_json(no_values)
    assert read.stats.values is None and read.stats.rules == facts.stats.rules
    assert read.to_json() == no_values
