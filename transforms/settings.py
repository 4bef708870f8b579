"""Options declared once, as data.

Every option of a run is a field of a frozen dataclass whose metadata says
how to read it from text (a flag, a SageMaker hyperparameter, a config-file
value) and how to write it back as JSON. `Settings` holds the data settings:
everything that shapes the examples, so they are fingerprinted (an output
keeps one set) and written into the metadata. Command-line flags, SageMaker
hyperparameters, the launcher's checks, config files, the fingerprint and
the metadata are all derived from these declarations (`declared`,
`parse_value`, `from_mapping`, `as_json`); adding a setting means adding a
field here and using it where it matters.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from transforms import spec, trackmap, windows


class OptionError(ValueError):
    """A value that does not fit its option; the message names the option."""


def option(default: Any, help: str, *, parse: Callable[[Any], Any] = str, dump: Optional[Callable[[Any], Any]] = None,
           metavar: Optional[str] = None, choices: Optional[tuple] = None, short: Optional[str] = None,
           flags: Optional[Callable[[Any, str], None]] = None):
    """A declared option: its default, help text, parser (from text or a
    native value) and JSON writer; `flags(group, dest)` adds its own
    command-line flags where one --name flag does not fit (the cohort's
    criteria: --include, --exclude, ... into one ordered list)."""
    return field(default=default, metadata={"help": help, "parse": parse, "dump": dump, "metavar": metavar,
                                            "choices": choices, "short": short, "flags": flags})


def flag_names(f: dataclasses.Field) -> list[str]:
    """The command-line flags of a declared option."""
    if f.metadata.get("flags"):
        return list(getattr(f.metadata["flags"], "names", ()))
    return [flag_name(f.name)] + ([f.metadata["short"]] if f.metadata["short"] else [])


def declared(cls) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def is_switch(f: dataclasses.Field) -> bool:
    return f.metadata["parse"] is parse_bool


COMMAND_LINE = "command line"  # a source whose options are named as flags in messages


def parse_value(f: dataclasses.Field, value: Any, source: str = "") -> Any:
    """The option's value from text or a native (YAML/JSON) value; OptionError names the option."""
    where = f"{source}: " if source and source != COMMAND_LINE else ""
    name = flag_name(f.name) if source == COMMAND_LINE else f.name
    if value is None:
        if f.default is None:
            return None
        raise OptionError(f"{where}{name}: a value is required")
    try:
        v = f.metadata["parse"](value)
    except (TypeError, ValueError) as e:
        raise OptionError(f"{where}{name} {value!r}: {e}") from None
    choices = f.metadata["choices"]
    if choices and v not in choices:
        raise OptionError(f"{where}{name} {value!r}: expected one of {', '.join(map(str, choices))}")
    return v


def dump_value(f: dataclasses.Field, value: Any) -> Any:
    """JSON form of an option's value (parse_value reads it back)."""
    if value is None:
        return None
    dump = f.metadata["dump"]
    return dump(value) if dump else value


def text_value(f: dataclasses.Field, value: Any) -> str:
    """An option's value as text (a flag's or a SageMaker hyperparameter's),
    which parse_value reads back: lists comma-separated, booleans
    true/false, mappings as JSON."""
    dumped = dump_value(f, value)
    if isinstance(dumped, dict) or (isinstance(dumped, list) and any(isinstance(v, (dict, list)) for v in dumped)):
        return json.dumps(dumped, separators=(",", ":"))
    if isinstance(dumped, list):
        return ",".join(map(str, dumped))
    if isinstance(dumped, bool):
        return str(dumped).lower()
    return str(dumped)


def add_flags(group, fields) -> None:
    """One argparse flag per declared option, its value kept as text (the
    declaration parses it, as it parses config files and hyperparameters);
    switches are flags without a value."""
    for f in fields:
        names = flag_names(f)
        if f.metadata.get("flags"):
            f.metadata["flags"](group, f.name)
            continue
        if is_switch(f):
            group.add_argument(*names, dest=f.name, action="store_const", const=True, default=None,
                               help=f.metadata["help"])
        else:
            default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
            group.add_argument(*names, dest=f.name, default=None, metavar=f.metadata["metavar"] or f.name.upper(),
                               help=f"{f.metadata['help']} (default {default})")


def as_json(obj) -> dict:
    return {f.name: dump_value(f, getattr(obj, f.name)) for f in declared(type(obj))}


def from_mapping(cls, mapping: Mapping[str, Any], source: str = "", allow: Iterable[str] = ()):
    """An instance of `cls` from {option name: value}; an unknown key is
    refused by name (keys in `allow` are left to the caller)."""
    names = {f.name for f in declared(cls)}
    unknown = sorted(set(mapping) - names - set(allow))
    if unknown:
        raise OptionError(f"{source + ': ' if source else ''}unknown option(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(names))})")
    return cls(**{f.name: parse_value(f, mapping[f.name], source) for f in declared(cls) if f.name in mapping})


# ---- parsers ---------------------------------------------------------------------

def parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _int(value) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected an integer")
    return int(str(value).strip()) if isinstance(value, str) else int(value)


def positive_int(value) -> int:
    v = _int(value)
    if v < 1:
        raise ValueError("must be a positive integer")
    return v


def non_negative_int(value) -> int:
    v = _int(value)
    if v < 0:
        raise ValueError("must be 0 or more")
    return v


def non_negative_float(value) -> float:
    v = float(value)
    if not v >= 0:
        raise ValueError("must be 0 or more")
    return v


def positive_float(value) -> float:
    v = float(value)
    if not v > 0:
        raise ValueError("must be more than 0")
    return v


def fraction(value) -> float:
    v = float(value)
    if not 0 <= v <= 1:
        raise ValueError("must be between 0 and 1")
    return v


def parse_split(value) -> tuple[int, int, int]:
    parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        vals = tuple(_int(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError("expected three integers like 70,15,15") from None
    if len(vals) != 3 or any(v < 0 for v in vals) or sum(vals) != 100:
        raise ValueError("expected three non-negative percentages summing to 100, like 70,15,15")
    return vals  # type: ignore[return-value]


def parse_folds(value) -> int:
    v = _int(value)
    if v == 1 or not 0 <= v <= 100:
        raise ValueError("expected 0 (no folds) or a number of folds from 2 to 100")
    return v


def _list(v) -> list:
    return list(v)


# ---- the data settings -------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """Everything that shapes the data. An output keeps one set (its
    fingerprint, with the contract and format versions, is checked on every
    run); the metadata records it."""

    window: int = option(spec.WINDOW_S, "window length in seconds", parse=positive_int)
    step: int = option(spec.STEP_S, "seconds between window starts", parse=positive_int)
    horizon: int = option(spec.HORIZON_S, "target = second window_start + window - 1 + horizon",
                          parse=positive_int)
    split: tuple[int, int, int] = option(spec.SPLIT_PERCENT, "train,validation,test percentages",
                                         parse=parse_split, dump=_list, metavar="T,V,T")
    split_seed: int = option(spec.SPLIT_SEED, "split hash seed", parse=_int)
    folds: int = option(0, "K: write K patient-disjoint folds fold-1 ... fold-K for cross-validation instead of "
                           "train/validation/test (fold = floor(bucket * K / 100) + 1, the split's bucket); 0: "
                           "no folds", parse=parse_folds, metavar="K")
    crop_anaesthesia: bool = option(False, "use only [anestart, aneend] of the clinical table "
                                           "(default: the whole recording)", parse=parse_bool)
    emit_mask: bool = option(False, "add feature 'observed' (1 = measured second, 0 = imputed)",
                             parse=parse_bool)
    emit_delta: bool = option(False, "add feature 'since_measured' (seconds since the feature's last measured "
                                     "value, capped at 600, / 600; 1 = never measured yet)", parse=parse_bool)
    tracks: Optional[trackmap.TrackMap] = option(
        None, "track map (YAML or JSON, or a shipped map's name: " + ", ".join(trackmap.shipped())
              + "): source tracks of other monitors, added to or replacing the built-in ones",
        parse=trackmap.load, dump=trackmap.TrackMap.as_json, metavar="FILE")

    def __post_init__(self):
        if self.folds and self.split != spec.SPLIT_PERCENT:
            raise OptionError("folds and split exclude each other: folds take the place of "
                              "train/validation/test")

    @property
    def split_names(self) -> tuple[str, ...]:
        """The output's splits: train, validation, test; or the folds."""
        return windows.fold_names(self.folds) if self.folds else spec.SPLIT_NAMES

    def split_of(self, key) -> str:
        """The split a split key (transforms.windows.split_key) falls in under these settings."""
        return windows.assign_split(key, self.split, self.split_seed, self.split_names, self.folds)

    @property
    def split_shares(self) -> tuple[float, ...]:
        """Each split's percentage of the buckets."""
        return (100 / self.folds,) * self.folds if self.folds else tuple(self.split)

    def as_json(self) -> dict:
        return as_json(self)

    def feature_spec(self) -> spec.FeatureSpec:
        """The time-series features these settings produce (the built-in
        spec, with the track map's sources in place)."""
        return self.tracks.apply() if self.tracks is not None else spec.DEFAULT_SPEC

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "Settings":
        return from_mapping(Settings, {k: v for k, v in d.items() if k not in FINGERPRINT_EXTRA})


# Written into the fingerprint beside the settings (they shape the bytes too).
FINGERPRINT_EXTRA = ("spec_version", "format_version")
