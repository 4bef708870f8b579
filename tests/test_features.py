"""Pure per-case functions against hand-computed values (the data contract, docs/data-contract.md)."""
import numpy as np
import pytest

from transforms import features, spec
from transforms.features import ABSENT, AFTER_CARRIED, AFTER_DEFAULT, BEFORE, CARRIED, CLINICAL_ZERO, MEASURED

NAN = np.nan


def raw_with(track: str, values, T=None) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    T = T or len(values)
    raw = np.full((T, len(spec.DEFAULT_SPEC.source_tracks)), np.nan)
    raw[: len(values), spec.DEFAULT_SPEC.source_tracks.index(track)] = values
    return raw


def feature_col(values, name):
    return values[:, spec.DEFAULT_SPEC.feature_names.index(name)]


def test_propofol_10_ml_h_at_50_kg_is_4_mg_kg_h():
    v, _ = features.select_sources(raw_with("Orchestra/PPF20_RATE", [10.0]), weight_kg=50, ibw_kg=60)
    assert feature_col(v, "Propofol_INF")[0] == pytest.approx(4.0)


def test_remifentanil_6_ml_h_rftn20_at_60_kg():
    v, _ = features.select_sources(raw_with("Orchestra/RFTN20_RATE", [6.0]), weight_kg=60, ibw_kg=60)
    assert feature_col(v, "Remifentanil_INF")[0] == pytest.approx(0.03333, abs=1e-5)


def test_remifentanil_rftn50_uses_its_own_concentration():
    v, _ = features.select_sources(raw_with("Orchestra/RFTN50_RATE", [6.0]), weight_kg=60, ibw_kg=60)
    assert feature_col(v, "Remifentanil_INF")[0] == pytest.approx(6 * 50 / 60 / 60)


def test_noradrenaline_is_a_volume_rate_converted_to_ug_kg_min():
    v, _ = features.select_sources(raw_with("Orchestra/NEPI_RATE", [3.0]), weight_kg=50, ibw_kg=60)
    assert feature_col(v, "Noradrenalin_INF")[0] == pytest.approx(3 * 20 / 60 / 50)  # 0.02


def test_etco2_38_mmhg_is_5_066_kpa():
    v, _ = features.select_sources(raw_with("Solar8000/ETCO2", [38.0]), 70, 70)
    assert feature_col(v, "ETCO2")[0] == pytest.approx(5.066, abs=1e-3)


def test_peep_hpa_to_cmh2o_and_tv_per_ibw():
    raw = raw_with("Primus/PEEP_MBAR", [5.0])
    raw[0, spec.DEFAULT_SPEC.source_tracks.index("Primus/TV")] = 450.0
    v, _ = features.select_sources(raw, 70, ibw_kg=75.0)
    assert feature_col(v, "PEEP")[0] == pytest.approx(5.0986)
    assert feature_col(v, "TV")[0] == pytest.approx(6.0)


def test_devine_ibw():
    assert features.ideal_body_weight(180, "M") == pytest.approx(74.99, abs=0.01)
    assert features.ideal_body_weight(160, "F") == pytest.approx(45.5 + 0.9055 * 7.6)
    # Missing height 170 cm, missing sex F; clamped to [30, 150].
    assert features.ideal_body_weight(None, None) == pytest.approx(45.5 + 0.9055 * (170 - 152.4))
    assert features.ideal_body_weight(100, "F") == 30.0


def test_dose_weight_default_is_recorded():
    assert features.dose_weight({"weight": 82.5}) == (82.5, False)
    assert features.dose_weight({"weight": None}) == (70.0, True)
    assert features.dose_weight({"weight": 0}) == (70.0, True)


def test_first_plausible_source_wins_and_implausible_is_missing():
    raw = raw_with("Solar8000/ART_SBP", [120.0, 400.0, NAN, 5.0])
    raw[:, spec.DEFAULT_SPEC.source_tracks.index("Solar8000/NIBP_SBP")] = [110.0, 111.0, 112.0, 113.0]
    v, src = features.select_sources(raw, 70, 70)
    np.testing.assert_allclose(feature_col(v, "BP_SYS"), [120.0, 111.0, 112.0, 113.0])
    np.testing.assert_array_equal(feature_col(src, "BP_SYS"), [0, 1, 1, 1])
    # HR 0 and 350 are artifacts: missing, then imputed.
    v, _ = features.select_sources(raw_with("Solar8000/HR", [0.0, 80.0, 350.0]), 70, 70)
    np.testing.assert_array_equal(np.isnan(feature_col(v, "HR")), [True, False, True])


def feat(name):
    return spec.DEFAULT_SPEC.timeseries[spec.DEFAULT_SPEC.feature_names.index(name)]


def test_impute_before_between_after_for_a_vital_sign():
    x = np.full(1000, NAN)
    x[10] = 80.0
    x[12] = 90.0  # a lone missing second at 11 is carried, not averaged
    out, rule = features.impute(x, feat("HR"))
    assert (out[:10] == 70).all() and (rule[:10] == BEFORE).all()
    assert out[11] == 80.0 and rule[11] == CARRIED
    assert out[12] == 90.0 and rule[12] == MEASURED
    # Carried 10 min after the last sample, then the default.
    assert out[12 + 600] == 90.0 and rule[12 + 600] == AFTER_CARRIED
    assert out[12 + 601] == 70.0 and rule[12 + 601] == AFTER_DEFAULT


def test_spo2_carries_5_minutes():
    x = np.full(700, NAN)
    x[0] = 99.0
    out, _ = features.impute(x, feat("SPO2"))
    assert out[300] == 99.0 and out[301] == 96.0


def test_drugs_are_zero_before_and_at_once_after():
    x = np.full(50, NAN)
    x[5:10] = 4.0
    out, rule = features.impute(x, feat("Propofol_INF"))
    np.testing.assert_array_equal(out, [0] * 5 + [4.0] * 5 + [0] * 40)
    assert rule[10] == AFTER_DEFAULT


def test_noradrenaline_pump_gap_over_10_s_is_clinical_zero():
    x = np.full(60, NAN)
    x[0] = 0.05
    x[11] = 0.06  # gap of 10 missing seconds: carried
    x[23] = 0.07  # gap of 11 missing seconds: clinical zero
    x[30] = 0.08
    out, rule = features.impute(x, feat("Noradrenalin_INF"))
    assert (out[1:11] == 0.05).all() and (rule[1:11] == CARRIED).all()
    assert (out[12:23] == 0.0).all() and (rule[12:23] == CLINICAL_ZERO).all()
    assert (out[24:30] == 0.07).all()
    # Other features carry any gap.
    out2, _ = features.impute(x, feat("Propofol_INF"))
    assert (out2[12:23] == 0.06).all()


def test_feature_without_data_is_before_value_throughout():
    out, rule = features.impute(np.full(20, NAN), feat("BP_MAP"))
    assert (out == 100.0).all() and (rule == ABSENT).all()


def test_normalise_and_inverse():
    v = np.array([20.0, 110.0, 200.0, 250.0, 0.0])
    n = features.normalise(v, 20, 200)
    np.testing.assert_allclose(n, [-1, 0, 1, 1, -1])
    np.testing.assert_allclose(features.denormalise(n[:3], 20, 200), v[:3])
    assert features.denormalise_feature(np.array([0.0]), "Remifentanil_INF")[0] == pytest.approx(0.4)


def test_static_features_and_defaults():
    row = {"age": 60, "sex": "M", "height": 180, "weight": 80, "bmi": None, "asa": None}
    st, defaulted = features.static_features(row)
    assert st[0] == pytest.approx(0.0)  # 60 of 0..120
    assert st[1] == 1.0  # M
    assert st[4] == pytest.approx((80 / 1.8 ** 2 - 10) / 40 * 2 - 1)  # bmi from weight/height
    assert st[5] == pytest.approx((2 - 1) / 5 * 2 - 1)  # asa default 2
    assert defaulted == ["asa"]
    st, defaulted = features.static_features(None)
    assert st[1] == -1.0 and len(defaulted) == 6


def test_case_stats_equal_a_direct_count():
    from transforms.per_case import case_stats
    rng = np.random.default_rng(7)
    T, F = 97, spec.DEFAULT_SPEC.n_features
    rules = rng.integers(0, len(features.RULE_NAMES), (T, F)).astype(np.int8)
    source = np.stack([rng.integers(-1, len(f.sources), T) for f in spec.DEFAULT_SPEC.timeseries], 1).astype(np.int8)
    filled = rng.uniform(-50, 400, (T, F))
    norm = features.normalise_timeseries(filled)
    st = case_stats(filled, norm, rules, source)
    assert st.seconds == T and st.values is None
    for f in range(F):
        assert st.rules[f] == [int((rules[:, f] == r).sum()) for r in range(len(features.RULE_NAMES))]
        n_src = len(spec.DEFAULT_SPEC.timeseries[f].sources)
        assert st.sources[f] == [int((source[:, f] == k).sum()) for k in range(n_src)]
        lo, hi = spec.DEFAULT_SPEC.timeseries[f].norm
        outside = (filled[:, f] < lo) | (filled[:, f] > hi)
        assert st.clipped[f] == int((outside & (rules[:, f] == features.MEASURED)).sum())
        assert st.imputed_outside[f] == int((outside & (rules[:, f] != features.MEASURED)).sum())


# ---- clinical entry errors (contract 1.1) ------------------------------------

def test_implausible_clinical_values_are_missing_and_listed():
    row = {"age": 430, "sex": " m ", "height": 500, "weight": 900, "bmi": None, "asa": 7}
    cv = features.clean_clinical(row)
    assert cv.values == {"age": None, "sex": "M", "height": None, "weight": None, "bmi": None, "asa": None}
    assert cv.implausible == {"age": 430, "height": 500, "weight": 900, "asa": 7}
    st, defaulted = features.static_features(row)
    assert defaulted == ["age", "height", "weight", "bmi", "asa"]
    np.testing.assert_allclose(st, [(50 / 120) * 2 - 1, 1.0, (70 / 130) * 2 - 1, (50 / 180) * 2 - 1,
                                    (14.2 / 40) * 2 - 1, (1 / 5) * 2 - 1], rtol=1e-6)
    # Dose weight and IBW take the defaults too: a 900 kg entry no longer divides doses by 13.
    assert features.dose_weight(row) == (70.0, True)
    assert features.ideal_body_weight(row["height"], row["sex"]) == pytest.approx(50 + 0.9055 * (170 - 152.4))
    v, _ = features.select_sources(raw_with("Orchestra/PPF20_RATE", [10.0]), *[features.dose_weight(row)[0]] * 2)
    assert feature_col(v, "Propofol_INF")[0] == pytest.approx(10 * 20 / 70)


@pytest.mark.parametrize("column,value,plausible", [
    ("age", 0, True), ("age", 120, True), ("age", -1, False), ("age", 120.5, False),
    ("height", 30, True), ("height", 250, True), ("height", 29.9, False), ("height", 251, False),
    ("weight", 1, True), ("weight", 350, True), ("weight", 0, False), ("weight", 351, False),
    ("bmi", 5, True), ("bmi", 100, True), ("bmi", 4.9, False), ("bmi", 101, False),
    ("asa", 1, True), ("asa", 6, True), ("asa", 0, False), ("asa", 7, False),
    ("weight", "heavy", False), ("weight", " 82 ", True),
])
def test_plausible_ranges_are_inclusive(column, value, plausible):
    cv = features.clean_clinical({column: value})
    assert (cv.get(column) is not None) == plausible
    assert (column in cv.implausible) == (not plausible)


def test_sex_any_case_and_spaces_else_missing():
    for raw, want in (("M", "M"), (" f ", "F"), ("m", "M")):
        assert features.clean_clinical({"sex": raw}).get("sex") == want
    cv = features.clean_clinical({"sex": "X"})
    assert cv.get("sex") is None and cv.implausible == {"sex": "X"}
    assert features.clean_clinical({"sex": None}).implausible == {}  # blank is missing, not an error
    assert features.static_features({"sex": "unknown"})[0][1] == -1.0  # F


def test_bmi_is_derived_only_from_plausible_weight_and_height_and_checked():
    cv = features.clean_clinical({"weight": 80, "height": 180, "bmi": 900})
    assert cv.get("bmi") == pytest.approx(80 / 1.8 ** 2) and cv.bmi_derived
    assert cv.implausible == {"bmi": 900}
    assert features.static_features({"weight": 80, "height": 180, "bmi": 900})[1] == ["age", "sex", "asa"]
    # A height entry error: no bmi from it, the default instead.
    cv = features.clean_clinical({"weight": 80, "height": 18})
    assert cv.get("bmi") is None and cv.implausible == {"height": 18}
    # Both plausible but the derived bmi is not (300 kg at 60 cm): checked too.
    cv = features.clean_clinical({"weight": 300, "height": 60})
    assert cv.get("bmi") is None and cv.implausible == {"bmi (from weight and height)": round(300 / 0.36, 2)}


def test_consumers_take_any_number_of_features_and_sources():
    """A spec with a 17th feature and a 4th source runs through the per-case
    transform, its statistics and the quality report."""
    import dataclasses

    from pipeline.output.contracts import DoneMarker
    from pipeline.report import quality as report
    from transforms.per_case import process_case
    from transforms.settings import Settings
    base = spec.DEFAULT_SPEC
    bp_map = base.feature("BP_MAP")
    bp_map4 = dataclasses.replace(bp_map, sources=bp_map.sources + (spec.Source("Intellivue/ABP_MEAN", "mmHg"),))
    temp = spec.Feature("TEMP", "degC", (spec.Source("Intellivue/TEMP", "degC"),), (25, 45), 36.5, 600, 36.5, (30, 42))
    fs = spec.FeatureSpec(tuple(bp_map4 if f.name == "BP_MAP" else f for f in base.timeseries) + (temp,),
                          base.targets)
    assert fs.n_features == 17 and fs.max_sources == 4
    T = 700
    raw = np.full((T, len(fs.source_tracks)), np.nan)
    raw[::2, fs.source_tracks.index("Intellivue/ABP_MEAN")] = 85.0  # only the 4th source of BP_MAP
    raw[::5, fs.source_tracks.index("Intellivue/TEMP")] = 36.0
    cw = process_case(1, raw, {"weight": 70}, Settings(), fs, split_key="1")
    assert cw.timeseries.shape == (cw.facts.windows, 300 * 17)
    ts = cw.timeseries.reshape(-1, 300, 17)
    assert features.denormalise(ts[0, 10, 16], 30, 42) == pytest.approx(36.0, abs=1e-4)
    assert features.denormalise(ts[0, 10, 3], 40, 180) == pytest.approx(85.0, abs=1e-4)
    st = cw.facts.stats
    assert st.sources[3] == [0, 0, 0, T // 2] and st.sources[16] == [T // 5]
    q = report.combine({1: DoneMarker(**vars(cw.facts))}, {}, fs)
    assert [f["name"] for f in q["features"]][-1] == "TEMP" and len(q["features"]) == 17
    assert q["features"][3]["sources"]["Intellivue/ABP_MEAN"] == 1.0
    html = report.render_html(q, "out", "complete")
    assert html.count("<tr><td class='l'>TEMP</td>") == 1
    assert report.hist_shares(q, "train").shape == (17, 20)  # the report's distribution chart: a row per feature
    assert report.hist_shares(q, cw.facts.split)[16].sum() == pytest.approx(1.0)
