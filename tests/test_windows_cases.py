"""Case selection, windows and targets, splits."""
import subprocess
import sys

import numpy as np
import pytest

from transforms import spec
from transforms.case_ids import CaseSpecError, case_file_candidates, parse_cases
from transforms.settings import parse_split
from transforms.windows import assign_split, make_windows, split_bucket, window_count


def test_parse_cases_mixed_padding_duplicates_order():
    assert parse_cases("1-3,17,0022,2,  5") == [1, 2, 3, 17, 22, 5]


@pytest.mark.parametrize("text,named", [
    ("1-5,x,9-3", ["'x'", "'9-3'"]),
    ("1,,2", ["''"]),
    ("-4", ["'-4'"]),
    ("0", ["'0'"]),
    ("1-2-3", ["'1-2-3'"]),
])
def test_parse_cases_names_every_bad_part(text, named):
    with pytest.raises(CaseSpecError) as err:
        parse_cases(text)
    for part in named:
        assert part in str(err.value)


def test_case_file_candidates():
    assert case_file_candidates("s3://b/in/", 22) == ["s3://b/in/0022.vital", "s3://b/in/22.vital"]
    assert case_file_candidates("d", 12345) == ["d/12345.vital"]


def test_window_count_formula():
    assert window_count(300 + 1) == 1
    assert window_count(300) == 0
    assert window_count(3600) == (3600 - 301) // 30 + 1 == 110
    assert window_count(1000, 300, 30, horizon=5) == (1000 - 305) // 30 + 1


def test_windows_and_target_position():
    T, F = 400, spec.DEFAULT_SPEC.n_features
    norm = (np.arange(T * F, dtype=np.float32) / (T * F)).reshape(T, F)
    starts, ts, tg = make_windows(norm, 300, 30, 1)
    assert list(starts) == [0, 30, 60, 90]
    assert ts.shape == (4, 300 * F)
    np.testing.assert_array_equal(ts[1].reshape(300, F), norm[30:330])  # row-major (time, feature)
    np.testing.assert_array_equal(tg[1], norm[30 + 299 + 1, spec.DEFAULT_SPEC.target_index])
    starts, _, tg = make_windows(norm, 300, 30, horizon=10)
    assert len(starts) == 4  # (400 - 300 - 10) // 30 + 1; the last target is second 399
    np.testing.assert_array_equal(tg[3], norm[90 + 299 + 10, spec.DEFAULT_SPEC.target_index])
    assert len(make_windows(norm[:309], 300, 30, horizon=10)[0]) == 0


def test_split_rule_and_defaults():
    import hashlib
    b = int(hashlib.sha256(b"42:22").hexdigest(), 16) % 100
    assert split_bucket(22) == b
    expected = "train" if b < 70 else "validation" if b < 85 else "test"
    assert assign_split(22) == expected
    counts = {s: 0 for s in spec.SPLIT_NAMES}
    for cid in range(1, 3001):
        counts[assign_split(cid)] += 1
    assert 0.66 < counts["train"] / 3000 < 0.74 and 0.12 < counts["test"] / 3000 < 0.18
    assert assign_split(5, (0, 0, 100)) == "test"


def test_split_is_stable_across_processes():
    ids = list(range(1, 200))
    here = [assign_split(i) for i in ids]
    code = "from transforms.windows import assign_split; print(','.join(assign_split(i) for i in range(1, 200)))"
    for seed in ("0", "123"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": ""})
        assert out.stdout.strip().split(",") == here


def test_parse_split():
    assert parse_split("80,10,10") == (80, 10, 10)
    for bad in ("70,15", "70,20,20", "a,b,c"):
        with pytest.raises(ValueError):
            parse_split(bad)


def test_clinical_table_duplicates(tmp_path):
    from pipeline.io.clinical import read_clinical
    p = tmp_path / "c.csv"
    p.write_text("caseid,age,sex,weight\n1,50,F,60\n2,60,M,80\n1,50,F,60\n3,40,M,70\n3,40,M,75\n")
    t = read_clinical(str(p))
    assert t.row(1) == {"caseid": 1, "age": 50, "sex": "F", "weight": 60}  # identical duplicate: one row
    assert t.row(3) is None and list(t.duplicates) == [3]
    assert "data rows 4, 5" in t.duplicates[3] and "weight: 70 vs 75" in t.duplicates[3]
    assert read_clinical(str(p), [1, 2]).duplicates == {}


def test_examples_are_protobufs_deterministic_serialization():
    """Same bytes in every process: a dataset can be rebuilt byte for byte."""
    import tensorflow as tf

    from transforms import encode
    rng = np.random.default_rng(3)
    starts = np.array([0, 30, 127, 128, 16383, 16384, 3_000_000], dtype=np.int64)  # 1-4 byte varints
    floats = {"timeseries": rng.random((7, 300 * 16), dtype=np.float32), "static": rng.random(6, dtype=np.float32),
              "targets": rng.random((7, 8), dtype=np.float32) * 2 - 1}
    got = encode.encode_examples(12345, starts, floats)
    for i, rec in enumerate(got):
        want = tf.train.Example(features=tf.train.Features(feature={
            "timeseries": tf.train.Feature(float_list=tf.train.FloatList(value=floats["timeseries"][i])),
            "static": tf.train.Feature(float_list=tf.train.FloatList(value=floats["static"])),
            "targets": tf.train.Feature(float_list=tf.train.FloatList(value=floats["targets"][i])),
            "case_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[12345])),
            "window_start": tf.train.Feature(int64_list=tf.train.Int64List(value=[starts[i]])),
        }))
        assert rec == want.SerializeToString(deterministic=True)
    code = ("import numpy as np, hashlib; from transforms import encode; "
            "print(hashlib.sha256(b''.join(encode.encode_examples(7, np.arange(3) * 30, "
            "{'b': np.ones((3, 5)), 'a': np.zeros(2)}))).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert len(digests) == 1


def test_the_embedded_samples_case_ids_fill_every_split():
    from pipeline.tools.sample import sample_case_ids, sample_split
    from transforms.settings import Settings
    for n, settings in ((20, Settings()), (4, Settings()), (12, Settings(split=(50, 25, 25), split_seed=7)),
                        (3, Settings(split=(80, 0, 20)))):
        ids = sample_case_ids(n, settings)
        assert len(ids) == len(set(ids)) == n
        got = [sample_split(i, settings) for i in ids]
        wanted = [name for name, pct in zip(spec.SPLIT_NAMES, settings.split) if pct]
        assert set(got) == set(wanted), (n, settings.split)
    ids = sample_case_ids(20)
    assert [sample_split(i) for i in ids].count("train") == 14  # 70 % of 20
