"""What people who train on the output ask for: a reader without TensorFlow,
cross-validation folds by patient, statistics of each split."""
import glob
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import INMEM, REPO, run_cli

from pipeline.reader import DamagedFile, OutputReader, parse_example
from pipeline.tools import sample
from transforms import statistics
from transforms.windows import assign_split, split_key

FEATURED = ["--emit-mask", "--emit-delta", "--window", "200", "--step", "20", "--horizon", "5", "--folds", "3",
            "--crop-anaesthesia", "--num-shards", "2"]


@pytest.fixture(scope="module")
def featured(tmp_path_factory):
    """An output with every optional feature: mask, delta, another window, step
    and horizon, cropping, two shards per fold, and 3 folds."""
    data = tmp_path_factory.mktemp("featured-data")
    sample.write_sample(str(data), list(range(1, 13)), 1500, missing_weight=2, missing_asa=3)
    out = str(tmp_path_factory.mktemp("featured-out"))
    assert run_cli("--input", str(data), "--output", out, *FEATURED, INMEM) == 0
    return out


def tf_examples(out: str, split: str) -> list[dict]:
    """Every example of a split as TensorFlow parses it, file by file in name order."""
    import tensorflow as tf
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    spec_ = {n: tf.io.FixedLenFeature([f["length"]], tf.float32 if f["type"] == "float" else tf.int64)
             for n, f in meta["format"]["features"].items()}
    files = sorted(glob.glob(f"{out}/{split}/*.tfrecord.gz"))
    return [{k: v.numpy() for k, v in tf.io.parse_single_example(r, spec_).items()}
            for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


# ---- the reader ------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["sample", "featured"])
def test_the_reader_returns_what_tensorflow_parses_example_by_example(which, run_output, featured):
    out = run_output[1] if which == "sample" else featured
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    window, n_feat = meta["format"]["shapes"]["timeseries"]
    total = 0
    for split in meta["splits"]:
        ours, theirs = list(OutputReader(out, split).examples()), tf_examples(out, split)
        assert len(ours) == len(theirs) == meta["splits"][split]["windows"]
        for a, b in zip(ours, theirs):
            assert a.keys() == b.keys() == set(meta["format"]["features"])
            for k in a:
                np.testing.assert_array_equal(a[k].ravel(), b[k])
                assert a[k].dtype == b[k].dtype
            assert a["timeseries"].shape == (window, n_feat) and a["case_id"].shape == ()
        total += len(ours)
    assert total > 100
    if which == "featured":
        assert {"observed", "since_measured"} <= set(ours[0]) and ours[0]["observed"].shape == (200, 16)


def test_batches_workers_and_a_seeded_shuffle(featured):
    meta = json.load(open(f"{featured}/preprocessing_metadata.json"))
    split = max(meta["splits"], key=lambda s: meta["splits"][s]["windows"])  # the fold with the most windows
    keys = [(int(e["case_id"]), int(e["window_start"])) for e in OutputReader(featured, split).examples()]
    # worker i of n: each file once
    shares = [OutputReader(featured, split, worker=i, num_workers=2) for i in range(2)]
    assert sorted(shares[0].files + shares[1].files) == sorted(glob.glob(f"{featured}/{split}/*.tfrecord.gz"))
    assert not set(shares[0].files) & set(shares[1].files)
    got = [(int(e["case_id"]), int(e["window_start"])) for r in shares for e in r.examples()]
    assert sorted(got) == sorted(keys)
    # batches
    batches = list(OutputReader(featured, split, batch_size=16))
    assert [b["timeseries"].shape[0] for b in batches[:-1]] == [16] * (len(batches) - 1)
    assert sum(b["case_id"].shape[0] for b in batches) == len(keys) and batches[0]["static"].shape == (16, 6)
    assert len(list(OutputReader(featured, split, batch_size=16, drop_remainder=True))) == len(keys) // 16
    # a seeded shuffle: a permutation, the same for the same seed and epoch, another for another epoch
    def order(seed, epoch=0):
        r = OutputReader(featured, split, shuffle_buffer=25, seed=seed)
        r.set_epoch(epoch)
        return [(int(e["case_id"]), int(e["window_start"])) for e in r]
    a = order(7)
    assert sorted(a) == sorted(keys) and a != keys
    assert order(7) == a and order(7, epoch=1) != a and order(8) != a


def test_a_damaged_file_is_named(featured, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(featured, out)
    victim = sorted(glob.glob(f"{out}/fold-1/*.tfrecord.gz"))[0]
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x04
    open(victim, "wb").write(bytes(data))
    with pytest.raises(DamagedFile, match=f"{victim}: damaged, unreadable"):
        list(OutputReader(str(out), "fold-1").examples())
    with pytest.raises(ValueError, match="has no split 'train'"):
        OutputReader(str(out), "train")


def test_the_reader_needs_no_tensorflow(featured):
    code = ("import sys; from pipeline.reader import OutputReader; "
            f"n = sum(1 for _ in OutputReader({featured!r}, 'fold-2')); "
            "bad = [m for m in ('tensorflow', 'apache_beam', 'tfx_bsl') if m in sys.modules]; "
            "print(n, bad)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    n, bad = res.stdout.split(" ", 1)
    assert int(n) == json.load(open(f"{featured}/preprocessing_metadata.json"))["splits"]["fold-2"]["windows"]
    assert bad.strip() == "[]"


def test_parse_example_reads_unpacked_lists_too():
    """Other writers may write repeated fields unpacked; ours packs them."""
    import tensorflow as tf
    ex = tf.train.Example(features=tf.train.Features(feature={
        "f": tf.train.Feature(float_list=tf.train.FloatList(value=[1.5, -2.0])),
        "i": tf.train.Feature(int64_list=tf.train.Int64List(value=[-3, 2 ** 40])),
        "b": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x", b"yz"]))}))
    got = parse_example(ex.SerializeToString())
    assert got["f"].tolist() == [1.5, -2.0] and got["i"].tolist() == [-3, 2 ** 40] and got["b"] == [b"x", b"yz"]
    # unpacked floats: field 1 of FloatList written one value at a time (wire type 5)
    import struct
    flist = b"".join(b"\x0d" + struct.pack("<f", v) for v in (0.25, 4.0))
    feature = b"\x12" + bytes([len(flist)]) + flist
    entry = b"\x0a\x01f" + b"\x12" + bytes([len(feature)]) + feature
    features = b"\x0a" + bytes([len(entry)]) + entry
    record = b"\x0a" + bytes([len(features)]) + features
    assert parse_example(record)["f"].tolist() == [0.25, 4.0]
    assert tf.io.parse_single_example(record, {"f": tf.io.FixedLenFeature([2], tf.float32)})["f"].numpy().tolist() \
        == [0.25, 4.0]


# ---- folds ------------------------------------------------------------------------------

def bucket(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), 16) % 100


def test_folds_by_hand():
    # worked out by hand: bucket(42:s9001) = 77, so with 5 folds floor(77 * 5 / 100) + 1 = 4
    assert bucket(42, "s9001") == 77 and bucket(42, "22") == 18 and bucket(42, "sP-17") == 25
    assert [assign_split("s9001", folds=k) for k in (2, 3, 5, 10)] == ["fold-2", "fold-3", "fold-4", "fold-8"]
    assert [assign_split("22", folds=k) for k in (2, 3, 5, 10)] == ["fold-1", "fold-1", "fold-1", "fold-2"]
    assert [assign_split("sP-17", folds=k) for k in (2, 3, 5, 10)] == ["fold-1", "fold-1", "fold-2", "fold-3"]
    for key in ("s9001", "22", "sP-17", "s42"):
        b = bucket(42, key)
        for k in (2, 3, 5, 10):
            assert assign_split(key, seed=42, folds=k) == f"fold-{b * k // 100 + 1}"
    assert bucket(42, "s9001") * 5 // 100 + 1 == int(assign_split("s9001", folds=5).split("-")[1])
    # a patient's folds and its train/validation/test come from the same bucket
    assert assign_split("s9001", folds=100) == f"fold-{bucket(42, 's9001') + 1}"


def test_folds_hold_whole_patients_and_everything_knows_them(featured, capsys):
    meta = json.load(open(f"{featured}/preprocessing_metadata.json"))
    assert list(meta["splits"]) == ["fold-1", "fold-2", "fold-3"] and meta["split"]["folds"] == 3
    assert meta["settings"]["folds"] == 3 and meta["verification"]["ok"]
    assert sorted(p.rsplit("/", 1)[-1] for p in glob.glob(f"{featured}/fold-*")) == ["fold-1", "fold-2", "fold-3"]
    fold_of = {}
    for s in meta["splits"]:
        for e in OutputReader(featured, s).examples():
            cid = int(e["case_id"])
            fold_of.setdefault(cid, set()).add(s)
    assert all(len(v) == 1 for v in fold_of.values())
    for cid, folds in fold_of.items():
        key = split_key(cid, sample.subject_id(cid))
        assert folds == {f"fold-{bucket(42, key) * 3 // 100 + 1}"}
    assert fold_of[1] == fold_of[2] == fold_of[3]  # one patient's operations
    assert meta["split"]["names"] == ["fold-1", "fold-2", "fold-3"]
    q = json.load(open(f"{featured}/report/quality.json"))
    assert list(q["splits"]) == ["fold-1", "fold-2", "fold-3"] and q["patients_in_two_splits"] == []
    assert run_cli("verify", "--output", featured) == 0
    assert "fold-2:" in capsys.readouterr().out
    from pipeline.tools.inspect_cmd import inspect
    assert inspect(featured, 1) == 0
    assert "fold-3" in capsys.readouterr().out


def test_folds_are_checked(tmp_path, capsys, featured):
    assert run_cli("--output", str(tmp_path / "a"), "--folds", "3", "--split", "50,25,25", INMEM) == 2
    assert "folds and split exclude each other" in capsys.readouterr().err
    assert run_cli("--output", str(tmp_path / "b"), "--folds", "1", INMEM) == 2
    assert "from 2 to 100" in capsys.readouterr().err
    data = json.load(open(f"{featured}/preprocessing_metadata.json"))["input"]
    assert run_cli("--input", data, "--output", featured, *[a if a != "3" else "4" for a in FEATURED], INMEM) == 2
    assert "'folds': (3, 4)" in capsys.readouterr().err  # the fingerprint: another fold count is another output


# ---- statistics -----------------------------------------------------------------------------

def clinical_units(values: np.ndarray, lo, hi) -> np.ndarray:
    return np.asarray(lo) + (values.astype(np.float64) + 1.0) * (np.asarray(hi) - np.asarray(lo)) / 2.0


def check(got: dict, x: np.ndarray, resolution: float) -> None:
    assert got["count"] == x.size
    if not x.size:
        return
    np.testing.assert_allclose([got["mean"], got["std"], got["min"], got["max"]],
                               [x.mean(), x.std(), x.min(), x.max()], rtol=1e-6, atol=1e-6)
    for q, est in got["quantiles"].items():
        exact = np.quantile(x, float(q), method="inverted_cdf")
        assert abs(est - exact) <= resolution + 1e-9, (q, est, exact, resolution)


@pytest.mark.parametrize("which", ["featured", "sample"])
def test_statistics_equal_numpy_over_the_decoded_output(which, featured, run_output):
    out = featured if which == "featured" else run_output[1]
    meta = json.load(open(f"{out}/preprocessing_metadata.json"))
    stats = meta["statistics"]
    assert json.load(open(f"{out}/statistics.json")) == stats
    window, F = meta["format"]["shapes"]["timeseries"]
    ts_spec, tg_spec, st_spec = meta["spec"]["timeseries"], meta["spec"]["targets"], meta["spec"]["static"]
    lo, hi = [f["norm"]["lo"] for f in ts_spec], [f["norm"]["hi"] for f in ts_spec]
    defaults = meta["cases"]["static_defaults"]
    checked = 0
    for split in meta["splits"]:
        exs = tf_examples(out, split)
        s = stats["splits"][split]
        if not exs:
            assert all(v["all"]["count"] == 0 for v in s["timeseries"].values())
            continue
        ts = clinical_units(np.stack([e["timeseries"] for e in exs]).reshape(-1, F), lo, hi)
        observed = np.stack([e["observed"] for e in exs]).reshape(-1, F) if "observed" in exs[0] else None
        for j, f in enumerate(ts_spec):
            got = s["timeseries"][f["name"]]
            check(got["all"], ts[:, j], got["resolution"])
            if observed is not None:
                check(got["measured"], ts[observed[:, j] == 1, j], got["resolution"])
            checked += 1
        tg = np.stack([e["targets"] for e in exs])
        for j, t in enumerate(tg_spec):
            got = s["targets"][t["name"]]
            check(got["all"], clinical_units(tg[:, j], t["norm"]["lo"], t["norm"]["hi"]), got["resolution"])
        st = np.stack([e["static"] for e in exs])
        cids = [int(e["case_id"][0]) for e in exs]
        for j, f in enumerate(st_spec):
            lo_s, hi_s = (f["norm"]["lo"], f["norm"]["hi"]) if f["norm"] else (-1.0, 1.0)
            x = clinical_units(st[:, j], lo_s, hi_s)
            got = s["static"][f["name"]]
            check(got["all"], x, got["resolution"])
            kept = np.array([f["name"] not in defaults.get(str(c), []) for c in cids])
            check(got["measured"], x[kept], got["resolution"])
    assert checked >= 16 * 2


def test_target_and_static_statistics_of_one_case_by_hand():
    """A 10-second series, windows of 4 every 2 s, horizon 1: windows start at
    0, 2, 4 (the last target second is 4 + 3 + 1 = 8); targets of feature 7
    (Propofol, 0..12 mg/kg/h) at seconds 4, 6, 8, measured at 4 and 8 only."""
    from transforms.per_case import value_stats
    fs = spec_default()
    T, F = 10, fs.n_features
    norm = np.full((T, F), -1.0)
    clinical = np.array([0, 1, 2, 3, 6, 5, 3, 7, 9, 11], float)  # propofol, mg/kg/h
    norm[:, 7] = clinical / 12 * 2 - 1
    measured = np.zeros((T, F), bool)
    measured[[4, 8], 7] = True
    measured[[0, 1, 2], 0] = True
    starts = np.array([0, 2, 4])
    from transforms.settings import Settings
    v = value_stats(norm, measured, starts, np.zeros(6, np.float32), ["asa"], Settings(window=4, step=2, horizon=1))
    ti = list(fs.targets).index("Propofol_INF")
    acc = statistics.Accumulator(len(fs.targets))
    acc.add(v.targets.all)
    got = acc.summary(ti, 0, 12)
    assert got["count"] == 3 and np.isclose(got["mean"], (6 + 3 + 9) / 3) and (got["min"], got["max"]) == (3, 9)
    acc = statistics.Accumulator(len(fs.targets))
    acc.add(v.targets.measured)
    got = acc.summary(ti, 0, 12)
    assert got["count"] == 2 and np.isclose(got["mean"], 7.5)  # seconds 4 and 8: 6 and 9
    # the time series: second s counted once per window holding it (0,1: 1; 2,3: 2; 4,5: 2; 6,7: 1)
    acc = statistics.Accumulator(F)
    acc.add(v.timeseries.all)
    weights = np.array([1, 1, 2, 2, 2, 2, 1, 1, 0, 0])
    assert acc.summary(7, 0, 12)["count"] == 12
    assert np.isclose(acc.summary(7, 0, 12)["mean"], (weights * clinical).sum() / 12)
    acc = statistics.Accumulator(F)
    acc.add(v.timeseries.measured)
    assert acc.summary(7, 0, 12)["count"] == 2 and acc.summary(0, 20, 200)["count"] == 1 + 1 + 2
    # static: once per window; asa was defaulted, so it is not among the measured
    acc = statistics.Accumulator(6)
    acc.add(v.static.measured)
    assert [acc.summary(j, -1, 1)["count"] for j in range(6)] == [3, 3, 3, 3, 3, 0]


def spec_default():
    from transforms import spec
    return spec.DEFAULT_SPEC


def test_statistics_merge_exactly_across_cases():
    rng = np.random.default_rng(3)
    lo, hi = np.array([0.0, -5.0]), np.array([10.0, 5.0])
    parts = [np.clip(rng.normal(3, 2, (2, n)), lo[:, None], hi[:, None]) for n in (50, 1, 300)]
    weights = [rng.integers(1, 4, p.shape[1]) for p in parts]
    acc = statistics.Accumulator(2)
    for p, w in zip(parts, weights):
        acc.add(statistics.case_columns(p, w, lo, hi))
    every = np.concatenate([np.repeat(p, w, axis=1) for p, w in zip(parts, weights)], axis=1)
    for j in range(2):
        check(acc.summary(j, lo[j], hi[j]), every[j], (hi[j] - lo[j]) / statistics.STAT_BINS)
