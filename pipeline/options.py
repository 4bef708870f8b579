"""What a run is asked to do: the run options (declared once, like the data
settings in transforms.settings) and the typed request the command line,
the SageMaker entry point and tests hand to `pipeline.api.run`.
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from pipeline.io import s3
from pipeline.io.documents import DocumentError, load_track_map, read_document
from pipeline.io.remote import WebOptions
from pipeline.run.coordination import Share
from transforms import cohort
from transforms.case_ids import parse_cases
from transforms.settings import (
    COMMAND_LINE,
    OptionError,
    Settings,
    declared,
    flag_name,
    fraction,
    from_mapping,
    is_switch,
    non_negative_float,
    non_negative_int,
    option,
    parse_bool,
    positive_float,
    positive_int,
    text_value,
)
from transforms.trackmap import TrackMapError

PROG = "master-poc-preprocess"  # the command (setup.py's console script of the same name)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT; rerun to continue
COMMANDS = ("run", "finalize", "verify")


def _cases(value) -> str:
    text = str(value)
    parse_cases(text)  # refuses a bad string, naming every bad part
    return text


def _optional_text(value) -> Optional[str]:
    text = str(value).strip()
    return text or None


def _criteria(value) -> tuple[cohort.Criterion, ...]:
    try:
        return cohort.parse_criteria(value)
    except cohort.CohortError as e:
        raise ValueError(str(e)) from None


class _Criterion(argparse.Action):
    """--include/--exclude/--require/--min-measured: one ordered list, as given."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest) or [])
        items.append((self.const, values))
        setattr(namespace, self.dest, items)


_CRITERIA_HELP = {
    cohort.INCLUDE: "keep a case when EXPR is true for its clinical row: a pandas DataFrame.query expression "
                    "over the clinical table's columns (a case without a row fails it)",
    cohort.EXCLUDE: "drop a case when EXPR is true for its clinical row",
    cohort.REQUIRE: "keep a case when each feature has one of its source tracks in the case's track list",
    cohort.MIN_MEASURED: "keep a case when at least FRACTION of its used seconds have a measured value of "
                         "FEATURE (decided after loading)",
}
_CRITERIA_METAVAR = {cohort.INCLUDE: "EXPR", cohort.EXCLUDE: "EXPR", cohort.REQUIRE: "F1,F2,...",
                     cohort.MIN_MEASURED: "FEATURE=FRACTION"}


def _criteria_flags(group, dest: str) -> None:
    for kind in cohort.KINDS:
        examples = "; ".join(f"{cohort.flag_of(kind)} \"{e}\"" for e in cohort.EXAMPLES[kind][:2])
        group.add_argument(cohort.flag_of(kind), dest=dest, action=_Criterion, const=kind, default=None,
                           metavar=_CRITERIA_METAVAR[kind],
                           help=f"{_CRITERIA_HELP[kind]}; repeatable, e.g. {examples}")


_criteria_flags.names = tuple(cohort.flag_of(k) for k in cohort.KINDS)


@dataclass(frozen=True)
class RunOptions:
    """Where the data is and how to run; not part of the data's fingerprint."""

    input: Optional[str] = option(None, "where the <id>.vital files are: a folder, an s3:// or gs:// prefix, an "
                                        "https:// base URL, or 'vitaldb' (VitalDB's open dataset from its web API); "
                                        "default: generate a sample", parse=_optional_text)
    clinical: Optional[str] = option(None, "the clinical table, local, s3:// or https:// (default: "
                                           "<input>/clinical_data.csv; with --input vitaldb its /cases table)",
                                     parse=_optional_text)
    output: str = option("output", "output folder or s3:// prefix")
    cases: Optional[str] = option(None, 'case ids, e.g. "1-10,17,0022" (default: every case in --input)',
                                  parse=_cases)
    share: Optional[Share] = option(None, "I/N: run stage 1 on this process's share of the cases (positions "
                                          "congruent to I-1 mod N); share 1 then waits for every case's marker "
                                          "and finalizes", parse=Share.parse, dump=str, metavar="I/N")
    num_shards: int = option(0, "files per split (0: about 20000 windows per file)", parse=non_negative_int)
    min_success_rate: float = option(0.95, "exit 1 if ok/(ok+failed) is below this; too-short cases count "
                                           "neither way", parse=fraction)
    no_finalize: bool = option(False, "run stage 1 only (one host's share of a multi-host job); finalize later",
                               parse=parse_bool)
    overwrite: bool = option(False, "discard an existing output made with other settings and start over",
                             parse=parse_bool)
    sample_cases: int = option(20, "cases to generate when --input is not given", parse=positive_int)
    sample_dir: Optional[str] = option(None, "where to generate the sample (default: a new temp folder)",
                                       parse=_optional_text)
    leader_wait_s: float = option(3600.0, "with --share: how long share 1 waits for the other shares' markers",
                                  parse=non_negative_float)
    poll_s: float = option(30.0, "with --share: seconds between share 1's looks at the markers",
                           parse=non_negative_float)
    shutdown_grace: float = option(30.0, "seconds to drain after SIGTERM/SIGINT before the pipeline is killed",
                                   parse=non_negative_float)
    progress_interval: float = option(30.0, "seconds between progress lines", parse=non_negative_float)
    s3_max_attempts: int = option(s3.DEFAULT_MAX_ATTEMPTS, "attempts per S3 call, Beam's and ours (botocore retries)",
                                  parse=positive_int)
    s3_retry_mode: str = option(s3.DEFAULT_RETRY_MODE, "botocore retry mode", choices=("standard", "adaptive"))
    http_timeout: float = option(30.0, "web input: seconds to connect, and the longest wait for the next bytes",
                                 parse=positive_float)
    http_max_attempts: int = option(8, "web input: attempts per request (backoff with jitter; Retry-After honoured)",
                                    parse=positive_int)
    http_connections: int = option(4, "web input: connections per process and server", parse=positive_int)
    verbose: bool = option(False, "log Beam's INFO messages too", parse=parse_bool, short="-v")
    # The cohort (pipeline.output.cohort): recorded, not fingerprinted, so changing it re-decides on the same output.
    cohort: tuple = option((), "the cohort's criteria, in the order a study writes them (a config file's "
                               "cohort: list of {include|exclude|require|min_measured: text}); evaluated: "
                               "include/exclude as given, then require, then min_measured; a case is counted at "
                               "the first it fails", parse=_criteria, dump=cohort.dump_criteria,
                           flags=_criteria_flags)
    track_list: Optional[str] = option(None, "a track table (CSV caseid,tname[,tid], as VitalDB's API /trks; "
                                             "local, s3:// or https://) for --require, so that a case it leaves "
                                             "out is never read (default: with --input vitaldb its /trks; else "
                                             "each file's own track information, read alone)",
                                       parse=_optional_text, metavar="FILE|URL")


    def web(self) -> WebOptions:
        """How this run talks to a web server (--input vitaldb or https://)."""
        return WebOptions(timeout_s=self.http_timeout, max_attempts=self.http_max_attempts,
                          connections=self.http_connections)


@dataclass(frozen=True)
class RunRequest:
    """One invocation: a command, the data settings, the run options and the
    Beam flags, which go to Beam untouched."""

    command: str = "run"  # run: stage 1 + stage 2; finalize: stage 2 alone; verify: check an output
    settings: Settings = field(default_factory=Settings)
    options: RunOptions = field(default_factory=RunOptions)
    beam_args: tuple[str, ...] = ()
    # Each stage in a child process group, so SIGTERM can drain and then kill
    # it (Beam's DirectRunner cannot be cancelled from inside). False runs
    # the stages in this process: for embedding and tests, no signal handling.
    supervised: bool = True

    def case_ids(self) -> Optional[list[int]]:
        if self.options.cases is None:
            return None
        try:
            return parse_cases(self.options.cases)
        except ValueError as e:
            raise OptionError(f"--cases {self.options.cases!r}: {e}") from None


def request_from_mapping(values: Mapping[str, Any], source: str, command: str = "run",
                         beam_args: tuple[str, ...] = ()) -> RunRequest:
    """A request from {option name: value} (a config file, SageMaker
    hyperparameters): data settings and run options by their declared names;
    an unknown name is refused, naming it."""
    values = dict(values)
    if isinstance(values.get("tracks"), str):  # a file or a shipped map's name: read here, where I/O lives
        try:
            values["tracks"] = load_track_map(values["tracks"])
        except TrackMapError as e:
            where = f"{source}: " if source and source != COMMAND_LINE else ""
            raise OptionError(f"{where}{'--tracks' if source == COMMAND_LINE else 'tracks'} "
                              f"{values['tracks']!r}: {e}") from None
    beam = values.pop("beam_args", None)
    setting_names = {f.name for f in fields(Settings)}
    settings = from_mapping(Settings, {k: v for k, v in values.items() if k in setting_names}, source)
    opts = from_mapping(RunOptions, {k: v for k, v in values.items() if k not in setting_names}, source)
    extra = tuple(shlex.split(beam)) if isinstance(beam, str) else tuple(beam or ())
    return RunRequest(command, settings, opts, extra + tuple(beam_args))


# A config file's section for the SageMaker launcher (master-poc-launch reads
# it; the main command leaves it alone), and the launcher's block of extra
# hyperparameters, which are job options like the file's top level.
SAGEMAKER_SECTION = "sagemaker"
HYPERPARAMETERS_BLOCK = "hyperparameters"


def read_config(path: str) -> tuple[dict, dict]:
    """A --config file (YAML or JSON, local or s3://): ({option name: value},
    with the hyperparameters block merged; the sagemaker section)."""
    try:
        doc = read_document(path, f"--config {path}")
    except DocumentError as e:
        raise OptionError(str(e)) from None
    doc = doc or {}
    if not isinstance(doc, dict):
        raise OptionError(f"--config {path}: expected a mapping of option: value")
    section = doc.pop(SAGEMAKER_SECTION, None) or {}
    block = doc.pop(HYPERPARAMETERS_BLOCK, None) or {}
    for name, part in ((SAGEMAKER_SECTION, section), (HYPERPARAMETERS_BLOCK, block)):
        if not isinstance(part, dict):
            raise OptionError(f"--config {path}: {name}: expected a mapping of option: value")
    return {**doc, **block}, section


def load_config(path: str) -> dict:
    """The job's options in a --config file (its sagemaker section is the launcher's)."""
    return read_config(path)[0]


def settings_flags(settings: Settings) -> list[str]:
    """The flags that reproduce `settings` (only those not at their default)."""
    out: list[str] = []
    for f in declared(Settings):
        value = getattr(settings, f.name)
        if value == f.default:
            continue
        if is_switch(f):
            if value:
                out.append(flag_name(f.name))
        else:
            out += [flag_name(f.name), text_value(f, value)]
    return out


def cohort_flags(options: RunOptions) -> list[str]:
    """The flags that give the same cohort."""
    out = [x for c in options.cohort for x in (c.flag, c.text)]
    return out + (["--track-list", options.track_list] if options.track_list else [])


def finish_command(input_dir: Optional[str], output: str, cases: str, flags: list[str] = ()) -> str:
    """What completes a job whose leader stopped waiting: the whole job once
    more in one process, with the job's `flags`; committed cases are
    skipped, so it processes only what is missing, then finalizes."""
    cmd = [PROG, "--output", output, "--cases", cases, *flags]
    if input_dir:
        cmd[1:1] = ["--input", input_dir]
    return shlex.join(cmd)


__all__ = ["RunOptions", "RunRequest", "request_from_mapping", "settings_flags", "finish_command", "OptionError",
           "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "COMMANDS"]
