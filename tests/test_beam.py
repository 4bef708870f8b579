"""TestPipeline tests of the Beam transforms, counters, and portability."""
import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from conftest import BAD_MAGIC, DUPLICATE_ROW, EMPTY, MISSING, NO_ROW, NO_TRACKS, SHORT, TRUNCATED

from pipeline.io.clinical import ClinicalTable, read_clinical
from pipeline.io.identity import FileIdentity
from pipeline.io.sources import Source
from pipeline.io.vital import CaseTodo, RawCase, StepSeconds
from pipeline.output import storage
from pipeline.output.contracts import DoneMarker, Member, Stage1Job, Stage2Job
from pipeline.stages import stage1, stage2
from pipeline.stages.dofns import FAILED, ArraysCoder, EncodeCase, LoadCase, TransformCase
from transforms import encode, spec
from transforms.per_case import CaseWindows, process_case
from transforms.settings import Settings

OPTS = ["--direct_running_mode=in_memory"]


def test_load_case_routes_broken_files_to_the_dead_letter_output(dataset):
    clinical = read_clinical(f"{dataset}/clinical_data.csv")
    with BeamTestPipeline(options=PipelineOptions(OPTS)) as p:
        side = beam.pvalue.AsSingleton(p | "Clin" >> beam.Create([clinical]))
        res = (p | beam.Create([1, TRUNCATED, BAD_MAGIC, EMPTY, NO_TRACKS, MISSING, DUPLICATE_ROW])
               | beam.ParDo(LoadCase(Source.for_location(dataset), Settings()), side).with_outputs(FAILED, main="ok"))
        assert_that(res.ok | beam.Map(lambda r: (r.case_id, r.raw.shape[1] > 0, r.row["caseid"])),
                    equal_to([(1, True, 1)]), label="Loaded")
        assert_that(res[FAILED] | beam.Map(lambda f: (f.case_id, f.reason)),
                    equal_to([(TRUNCATED, "corrupt_file"), (BAD_MAGIC, "corrupt_file"), (EMPTY, "corrupt_file"),
                              (NO_TRACKS, "no_tracks"), (MISSING, "missing_file"),
                              (DUPLICATE_ROW, "duplicate_clinical_row")]), label="Failed")


def test_transform_case_uses_the_clinical_side_input(dataset):
    clinical = read_clinical(f"{dataset}/clinical_data.csv")
    with BeamTestPipeline(options=PipelineOptions(OPTS)) as p:
        side = beam.pvalue.AsSingleton(p | "Clin" >> beam.Create([clinical]))
        res = (p | beam.Create([2, SHORT, NO_ROW])
               | beam.ParDo(LoadCase(Source.for_location(dataset), Settings()), side)
               | beam.ParDo(TransformCase(Settings())))
        assert_that(res | beam.Map(lambda oc: (oc[1].case_id, oc[1].facts.windows, oc[1].facts.dose_weight_default,
                                               oc[1].facts.no_clinical_row)),
                    equal_to([(2, (1500 - 301) // 30 + 1, True, False), (SHORT, 0, False, False),
                              (NO_ROW, 40, True, True)]))


def test_process_cases_commits_and_counts(dataset, tmp_path):
    out = str(tmp_path)
    clinical = read_clinical(f"{dataset}/clinical_data.csv")
    p = BeamTestPipeline(options=PipelineOptions(OPTS))
    ids = p | beam.Create([1, 2, SHORT, EMPTY])
    side = beam.pvalue.AsSingleton(p | "Clin" >> beam.Create([clinical]))
    committed, failed = ids | stage1.ProcessCases(Source.for_location(dataset), out, Settings(), side)
    assert_that(committed | beam.Map(lambda d: (d.case_id, d.status)),
                equal_to([(1, "ok"), (2, "ok"), (SHORT, "too_short")]), label="Committed")
    assert_that(failed | beam.Map(lambda f: f.case_id), equal_to([EMPTY]), label="Failed")
    result = p.run()
    result.wait_until_finish()
    c = {m.key.metric.name: m.committed for m in result.metrics().query(MetricsFilter())["counters"]}
    assert c["cases_ok"] == 2 and c["cases_too_short"] == 1 and c["cases_failed"] == 1
    assert c["windows_written"] == 2 * 40
    assert storage.marker_ids(out, storage.DONE) == {1, 2, SHORT}
    assert storage.marker_ids(out, storage.FAILED) == {EMPTY}
    assert storage.read_json(storage.marker_path(out, storage.FAILED, EMPTY))["reason"] == "corrupt_file"


def test_whole_graph_serialises_to_the_portable_representation(dataset, tmp_path):
    """Runner-neutral: pickled DoFns, side inputs, no driver-only objects."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: F401
    p = beam.Pipeline(options=PipelineOptions(OPTS))
    stage1.build_stage1(p, Stage1Job(output=str(tmp_path), settings=Settings(), case_ids=[1, 2],
                                    source=Source.for_location(dataset),
                                    clinical=ClinicalTable("c.csv", {1: {"weight": 70}})))
    proto = p.to_runner_api()
    names = {t.unique_name for t in proto.components.transforms.values()}
    for label in ("ReadCases", "ProcessCases/LoadCase", "ProcessCases/TransformCase", "ProcessCases/CommitCases",
                  "ProcessCases/RecordFailures"):
        assert label in names
    roundtrip = beam.Pipeline.from_runner_api(proto, p.runner, p._options)
    assert {t.unique_name for t in roundtrip.to_runner_api().components.transforms.values()} == names
    p2 = beam.Pipeline(options=PipelineOptions(OPTS))
    plans = stage2.plan_shards("o", {1: marker(1, "train", 3, [[100, 3]])}, ("train",), 0)
    stage2.build_stage2(p2, Stage2Job(output=str(tmp_path), settings=Settings(), plans=plans))
    assert "WriteShards" in {t.unique_name for t in p2.to_runner_api().components.transforms.values()}


def marker(cid, split, windows, members):
    return DoneMarker.from_json({"case_id": cid, "split": split, "windows": windows, "members": members})


def test_plan_shards_balances_and_is_deterministic():
    done = {c: marker(c, "train" if c % 3 else "test", 10 + c, [[500, 10], [300, c]]) for c in range(1, 31)}
    a = stage2.plan_shards("o", done, ("train", "validation", "test"), num_shards=4)
    b = stage2.plan_shards("o", dict(reversed(list(done.items()))), ("train", "validation", "test"), num_shards=4)
    assert a == b
    train = [p for p in a if p.split == "train"]
    assert len(train) == 4 and sum(p.windows for p in train) == sum(10 + c for c in range(1, 31) if c % 3)
    assert max(p.windows for p in train) - min(p.windows for p in train) <= 40
    assert sorted(c.case_id for p in a for c in p.cases) == list(range(1, 31))
    assert all(c.path == f"o/cases/{p.split}/{c.case_id}.tfrecord.gz" for p in a for c in p.cases)
    # Never more shards than cases.
    assert len([p for p in stage2.plan_shards("o", done, ("test",), num_shards=50)]) == 10


def test_per_case_intermediates_have_a_coder_that_estimates_from_array_bytes():
    raw = RawCase(5, "in/0005.vital", np.arange(30.0).reshape(10, 3), ["Solar8000/HR"], StepSeconds(parse=0.1),
                  input=FileIdentity("in/0005.vital", 123, crc32c="0a1b2c3d"))
    coder = beam.coders.registry.get_coder(RawCase)
    assert isinstance(coder, ArraysCoder) and isinstance(beam.coders.registry.get_coder(CaseWindows), ArraysCoder)
    assert coder.get_impl().estimate_size(raw) == 1024 + 240  # no pickling to estimate
    back = coder.decode(coder.encode(raw))
    assert (back.case_id, back.path, back.tracks_found, back.input, back.timings) == (
        5, "in/0005.vital", ["Solar8000/HR"], FileIdentity("in/0005.vital", 123, crc32c="0a1b2c3d"),
        StepSeconds(parse=0.1))
    np.testing.assert_array_equal(back.raw, raw.raw)


def _steps(dataset, todo, clinical=None):
    """One case through LoadCase, TransformCase and EncodeCase, called directly."""
    clinical = clinical or read_clinical(f"{dataset}/clinical_data.csv")
    load, transform = LoadCase(Source.for_location(dataset), Settings()), TransformCase(Settings())
    load.setup()
    transform.setup()
    [rc] = load.process(todo, clinical)
    [(origin, cw)] = transform.process(rc)
    [(origin, facts, obj)] = EncodeCase().process((origin, cw))
    return rc, origin, cw, facts, obj


def test_encode_case_gives_the_compressed_object_that_commit_writes(dataset, tmp_path):
    """EncodeCase serializes and compresses (timed as encode and compress);
    commit_case writes exactly its bytes and members, then the marker."""
    out = str(tmp_path)
    _, origin, cw, facts, obj = _steps(dataset, 2)
    examples = encode.encode_examples(2, cw.starts, cw.example_floats())
    data, members = encode.gzip_members(examples, encode.WINDOWS_PER_MEMBER, encode.GZIP_LEVEL)
    assert (obj.data, [list(m) for m in obj.members], obj.windows) == (data, members, facts.windows)
    assert [k for k, _ in origin.timings.items()] == ["load", "parse", "transform", "encode", "compress"]
    marker = stage1.commit_case(out, origin, facts, obj)
    assert marker.object == storage.case_object(out, facts.split, 2) and marker.status == "ok"
    with open(marker.object, "rb") as fh:
        assert fh.read() == obj.data
    assert (marker.object_bytes, marker.members) == (len(data), tuple(Member(b, r) for b, r in members))
    assert list(marker.to_json()["timings"]) == ["load", "parse", "transform", "encode", "compress", "write"]
    assert storage.read_json(storage.marker_path(out, storage.DONE, 2))["members"] == members
    # A case too short for a window: no members, no object, no compress step.
    _, short_origin, _, short_facts, short = _steps(dataset, SHORT)
    assert short == encode.CaseObject() and short.windows == 0 and short_origin.timings.compress is None
    m = stage1.commit_case(out, short_origin, short_facts, short)
    assert (m.status, m.object, m.members) == ("too_short", DoneMarker(SHORT).object, ())
    assert list(m.to_json()["timings"]) == ["load", "parse", "transform", "encode", "write"]


def test_the_load_step_decides_a_changed_input_and_gives_the_tables_split_key(dataset):
    """Whether the file's content changed since an earlier commit is decided
    where it is read (LoadCase); the split key comes from the clinical table;
    TransformCase only hands both on (the origin, the facts)."""
    clinical = read_clinical(f"{dataset}/clinical_data.csv")
    rc, origin, cw, _, _ = _steps(dataset, 2, clinical)
    assert rc.changed_input is None and origin.changed_input is None
    assert rc.split_key == clinical.split_key(2) == cw.facts.split_key
    assert cw.facts.split == Settings().split_of(clinical.split_key(2))
    same = rc.input
    assert _steps(dataset, CaseTodo(2, same), clinical)[0].changed_input is None  # same bytes: no change
    other = rc.input.read(crc32c="00000000")
    rc2, origin2, _, _, _ = _steps(dataset, CaseTodo(2, other), clinical)
    assert rc2.changed_input == other == origin2.changed_input
    rc3 = _steps(dataset, NO_ROW, clinical)[0]  # no clinical row: split by the case id
    assert rc3.row is None and rc3.split_key == str(NO_ROW) == clinical.split_key(NO_ROW)


def test_a_marker_of_an_earlier_version_reads_and_writes_as_it_was():
    """A clinical identity recorded before contract 1.2 has no format and no
    split key; a marker without timings, tracks or input reads too."""
    old = {"case_id": 3, "split": "train", "windows": 2, "clinical": {"path": "c.csv", "bytes": 10, "sha256": "ab"},
           "input": {"path": "in/0003.vital", "bytes": 5, "mtime": 1.5}}
    m = DoneMarker.from_json(old)
    assert (m.clinical.by_patient, m.clinical.format, m.timings.items(), m.tracks) == (False, None, [], None)
    d = m.to_json()
    assert (d["clinical"], d["input"], d["timings"], d["changed_input"]) == (old["clinical"], old["input"], {}, None)
    bare = DoneMarker.from_json({"case_id": 4})
    assert (bare.to_json()["input"], bare.to_json()["clinical"]) == ({}, {})
    assert bare.to_json()["input"] is not DoneMarker(5).to_json()["input"]  # a fresh dict each time


def test_a_case_without_a_split_key_is_refused():
    raw = np.full((400, len(spec.DEFAULT_SPEC.source_tracks)), np.nan)
    with pytest.raises(ValueError, match="no split key"):
        process_case(1, raw, None, Settings(), split_key="")
