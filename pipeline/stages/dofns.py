"""Thin Beam wrappers around the pure per-case functions.

Each DoFn yields its result on the main output and a failed case on the
tagged output FAILED as a CaseFailure (a dead letter, written as the case's
failed marker), so one broken case never stops the run.
"""
from __future__ import annotations

import logging
import pickle
import time
import traceback
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam import pvalue

from pipeline.io.clinical import ClinicalTable
from pipeline.io.sources import Source
from pipeline.io.vital import CaseError, CaseOrigin, CaseTodo, RawCase, load_case, read_track_names
from transforms import cohort, encode
from transforms.cohort import Criterion
from transforms.per_case import CaseFailure, CaseWindows, process_case
from transforms.settings import Settings

NAMESPACE = "master_poc"
FAILED = "failed"
EXCLUDED = "excluded"  # a case the cohort's require leaves out, decided from its file's track list
_LOG = logging.getLogger(__name__)


def _internal(case_id: int, stage: str, e: Exception) -> pvalue.TaggedOutput:
    # A bug or an unexpected library error in one case: recorded with its
    # traceback in the log, the case fails, the run goes on.
    _LOG.error("case %s: unexpected error in %s:\n%s", case_id, stage, traceback.format_exc())
    return pvalue.TaggedOutput(FAILED, CaseFailure(case_id, "internal_error", f"{stage}: {type(e).__name__}: {e}"))


class ArraysCoder(beam.coders.Coder):
    """Coder of the per-case intermediates (RawCase, CaseWindows): pickle,
    with a size estimate from their numpy arrays.

    Beam estimates the size of sampled elements between fused steps by
    encoding them: all of the first 10 per output, then ~10/N. With the
    default coder that pickled megabytes of arrays per sampled case (about
    4 ms per 4-hour case in a 40-case run, measured with py-spy)."""

    def encode(self, value) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes):
        return pickle.loads(encoded)

    def estimate_size(self, value) -> int:
        return 1024 + sum(v.nbytes for v in vars(value).values() if isinstance(v, np.ndarray))

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return Any


beam.coders.registry.register_coder(RawCase, ArraysCoder)
beam.coders.registry.register_coder(CaseWindows, ArraysCoder)


class LoadCase(beam.DoFn):
    """case id + clinical table (side input) -> RawCase: the `.vital` file
    from its source (local, object store, web server; streamed), parsed by
    vitaldb, with the case's clinical row. A case with two different clinical
    rows fails before its file is read. For the cases in `check_tracks`, the
    cohort's require criteria are decided first from the file's track list
    alone (pipeline.io.vital.read_track_names): a case they leave out goes to
    the EXCLUDED output, its records never read."""

    def __init__(self, source: Source, settings: Settings, require: tuple[Criterion, ...] = (),
                 check_tracks: frozenset = frozenset()):
        self._source = source
        self._settings = settings
        self._require = require
        self._check = check_tracks

    def setup(self):
        self._spec = self._settings.feature_spec()

    def _excluded(self, case_id: int, located):
        """(Exclusion or None, located) from the file's track list."""
        names, located = read_track_names(self._source, case_id, located)
        unmet = cohort.first_missing_requirement(names, self._require, self._spec)
        if unmet is None:
            return None, located
        present = set(names)
        tracks = tuple(t for t in self._spec.source_tracks if t in present)
        return cohort.Exclusion(case_id, unmet.kind, unmet.text, tracks=tracks), located

    def process(self, todo, clinical: ClinicalTable):
        todo = todo if isinstance(todo, CaseTodo) else CaseTodo(int(todo))
        case_id = todo.case_id
        try:
            if case_id in clinical.duplicates:
                raise CaseError("duplicate_clinical_row", clinical.duplicates[case_id])
            located = todo.located
            if case_id in self._check:
                exclusion, located = self._excluded(case_id, located)
                if exclusion is not None:
                    yield pvalue.TaggedOutput(EXCLUDED, exclusion)
                    return
            rc = load_case(self._source, case_id, self._spec, located)
            rc.row, rc.split_key, rc.clinical = clinical.row(case_id), clinical.split_key(case_id), clinical.identity
            previous = todo.previous_input
            if previous is not None and previous.content_changed(rc.input):
                rc.changed_input = previous
            yield rc
        except CaseError as e:
            yield pvalue.TaggedOutput(FAILED, CaseFailure(case_id, e.code, e.detail))
        except Exception as e:  # dead letter, see _internal
            yield _internal(case_id, "LoadCase", e)


class TransformCase(beam.DoFn):
    """RawCase -> (CaseOrigin, CaseWindows): the pure process_case (features,
    imputation, normalisation, windows, targets, split), and what LoadCase
    found of the case's origin."""

    def __init__(self, settings: Settings):
        self._settings = settings

    def setup(self):
        self._spec = self._settings.feature_spec()

    def process(self, raw_case):
        try:
            t = time.perf_counter()
            cw = process_case(raw_case.case_id, raw_case.raw, raw_case.row, self._settings, self._spec,
                              split_key=raw_case.split_key)
            origin = CaseOrigin.of(raw_case)
            origin.timings.transform = time.perf_counter() - t
            yield origin, cw
        except Exception as e:  # dead letter, see _internal
            yield _internal(raw_case.case_id, "TransformCase", e)


class EncodeCase(beam.DoFn):
    """(CaseOrigin, CaseWindows) -> (CaseOrigin, CaseFacts, encode.CaseObject):
    the serialized tf.train.Examples, compressed as the case's object is written."""

    def process(self, element):
        origin, cw = element
        try:
            t = time.perf_counter()
            examples = encode.encode_examples(cw.case_id, cw.starts, cw.example_floats())
            t1 = time.perf_counter()
            origin.timings.encode = t1 - t
            obj = encode.case_object(examples)
            if examples:
                origin.timings.compress = time.perf_counter() - t1
            yield origin, cw.facts, obj
        except Exception as e:  # dead letter, see _internal
            yield _internal(cw.case_id, "EncodeCase", e)
