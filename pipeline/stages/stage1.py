"""Stage 1: cases -> committed per-case objects and markers (the checkpoint).

    ReadCases -> Reshuffle -> SkipCommitted -> LoadCase -> TransformCase
      -> EncodeCase -> CommitCases          (dead letters -> RecordFailures)

Every commit happens inside `process`, case by case: the DirectRunner gives
one bundle per worker, so anything left to `finish_bundle` would only be
written when a worker's whole share is done, and never if it is killed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from pipeline.io import s3
from pipeline.io.clinical import ClinicalTable
from pipeline.io.sources import Source
from pipeline.io.vital import CaseOrigin, CaseTodo, RawCase
from pipeline.output import storage
from pipeline.output.contracts import DoneMarker, FailedMarker, Member, Stage1Job
from pipeline.stages.dofns import EXCLUDED, FAILED, NAMESPACE, EncodeCase, LoadCase, TransformCase
from transforms import encode
from transforms.cohort import Criterion, Exclusion
from transforms.per_case import CaseFacts, CaseWindows
from transforms.settings import Settings

_LOG = logging.getLogger(__name__)


class SkipCommitted(beam.DoFn):
    """Drops cases that already have a done marker (resume) whose input file
    is still the one they were committed from (a stat: size and mtime, the
    store's ETag, a web server's HEAD; nothing is downloaded) and whose split
    key is still the one the clinical table gives (a table that gained or
    changed a subjectid would otherwise leave a patient in two splits); a
    case whose input or key changed since is processed again, as a CaseTodo
    that remembers the old input identity. Drops every case once the stop file exists (a shutdown was
    asked for: drain, start nothing new). The stop file is local to the
    machine that was signalled; on remote workers it never exists and this
    check is a no-op."""

    def __init__(self, source: Source, output: str, stop_file: Optional[str] = None):
        self._source = source
        self._out = output
        self._stop_file = stop_file
        self._skipped = Metrics.counter(NAMESPACE, "cases_skipped")
        self._changed = Metrics.counter(NAMESPACE, "cases_input_changed")
        self._deferred = Metrics.counter(NAMESPACE, "cases_deferred")
        self._rekeyed = Metrics.counter(NAMESPACE, "cases_split_key_changed")

    def setup(self):
        s3.prepare_process()

    def process(self, case_id: int, clinical: ClinicalTable):
        if self._stop_file and os.path.exists(self._stop_file):
            self._deferred.inc()
            return
        marker = storage.marker_path(self._out, storage.DONE, case_id)
        if not storage.exists(marker):
            yield case_id
            return
        done = DoneMarker.from_json(storage.read_json(marker))
        key = clinical.split_key(case_id)
        if done.split_key != key:
            _LOG.warning("case %s: its split key changed since its commit (%s -> %s, the clinical table's "
                         "subjectid): processing it again", case_id, done.split_key, key)
            self._rekeyed.inc()
            yield case_id
            return
        committed = done.input
        try:
            located = self._source.locate(case_id)
        except LookupError:
            located = None  # the file is gone: the committed case stands
        except Exception as e:  # a failing store or server (TransferError, botocore's ClientError, ...)
            _LOG.warning("case %s: cannot check its input file (%s); its committed result stands", case_id, e)
            located = None
        if located is None or committed is None or committed.same_file(located[1]):
            self._skipped.inc()
            return
        _LOG.warning("case %s: its input file changed since its commit (%s -> %s): processing it again",
                     case_id, committed, located[1])
        self._changed.inc()
        yield CaseTodo(case_id, committed, located)


def commit_case(output: str, origin: CaseOrigin, facts: CaseFacts, obj: encode.CaseObject) -> DoneMarker:
    """Writes the case object (EncodeCase's bytes; complete or not at all),
    then its marker: the case's facts and origin. A case without windows has no object."""
    marker = DoneMarker(**{f.name: getattr(facts, f.name) for f in dataclasses.fields(facts)},
                        timings=origin.timings, input=origin.input, changed_input=origin.changed_input,
                        clinical=origin.clinical, tracks=origin.tracks,
                        status="ok" if obj.members else "too_short",
                        host=os.environ.get("MASTER_POC_HOST") or socket.gethostname(), worker=os.getpid())
    t = time.perf_counter()
    if obj.members:
        path = storage.case_object(output, facts.split, facts.case_id)
        storage.write_atomic(path, obj.data, storage.tmp_dir(output))
        marker.object, marker.object_bytes = path, len(obj.data)
        marker.members = tuple(Member(b, r) for b, r in obj.members)
    marker.timings.write = time.perf_counter() - t  # the marker's own write is not in the timings
    marker.committed = time.time()
    storage.write_done(output, marker)
    return marker


class CommitCases(beam.DoFn):
    def __init__(self, output: str):
        self._out = output
        self._ok = Metrics.counter(NAMESPACE, "cases_ok")
        self._short = Metrics.counter(NAMESPACE, "cases_too_short")
        self._windows = Metrics.counter(NAMESPACE, "windows_written")

    def process(self, element):
        marker = commit_case(self._out, *element)
        (self._ok if marker.has_windows else self._short).inc()
        self._windows.inc(marker.windows)
        yield marker


class RecordExclusions(beam.DoFn):
    """Cases the cohort's require leaves out, found from their file's track list."""

    def __init__(self, output: str):
        self._out = output
        self._excluded = Metrics.counter(NAMESPACE, "cases_excluded")

    def process(self, exclusion: Exclusion):
        storage.write_excluded(self._out, [exclusion])
        self._excluded.inc()
        yield exclusion


class RecordFailures(beam.DoFn):
    def __init__(self, output: str):
        self._out = output
        self._failed = Metrics.counter(NAMESPACE, "cases_failed")

    def process(self, fail: FailedMarker):
        _LOG.warning("case %s failed: %s: %s", fail.case_id, fail.reason, fail.detail)
        storage.write_failed(self._out, fail)
        self._failed.inc()
        yield fail


@beam.ptransform_fn
def ProcessCases(case_ids, source: Source, output: str, settings: Settings, clinical,
                 stop_file: Optional[str] = None, require: tuple[Criterion, ...] = (),
                 check_tracks: frozenset = frozenset()):
    """case ids -> committed cases; returns (committed, failed) PCollections
    of DoneMarker and FailedMarker. The cases in `check_tracks` are first
    held against the `require` criteria by their file's track list."""
    todo = (case_ids
            | "Reshuffle" >> beam.Reshuffle()  # spread cases over workers
            | "SkipCommitted" >> beam.ParDo(SkipCommitted(source, output, stop_file), clinical))
    loaded = (todo | "LoadCase" >> beam.ParDo(LoadCase(source, settings, require, check_tracks), clinical)
              .with_output_types(RawCase).with_outputs(FAILED, EXCLUDED, main="ok"))
    _ = loaded[EXCLUDED] | "RecordExclusions" >> beam.ParDo(RecordExclusions(output))
    transformed = (loaded.ok | "TransformCase" >> beam.ParDo(TransformCase(settings))
                   .with_output_types(beam.typehints.Tuple[CaseOrigin, CaseWindows]).with_outputs(FAILED, main="ok"))
    encoded = transformed.ok | "EncodeCase" >> beam.ParDo(EncodeCase()).with_outputs(FAILED, main="ok")
    committed = encoded.ok | "CommitCases" >> beam.ParDo(CommitCases(output))
    failed = ((loaded[FAILED], transformed[FAILED], encoded[FAILED])
              | "MergeFailures" >> beam.Flatten()
              | "RecordFailures" >> beam.ParDo(RecordFailures(output)))
    return committed, failed


def build_stage1(pipeline: beam.Pipeline, job: Stage1Job) -> beam.Pipeline:
    """Adds stage 1 of `job` to `pipeline` (unrun) and returns it."""
    ids = pipeline | "ReadCases" >> beam.Create(job.case_ids, reshuffle=False)
    side = beam.pvalue.AsSingleton(pipeline | "ReadClinical" >> beam.Create([job.clinical], reshuffle=False))
    _ = ids | "ProcessCases" >> ProcessCases(job.source, job.output, job.settings, side, job.stop_file,
                                             job.require, job.check_tracks)
    return pipeline
