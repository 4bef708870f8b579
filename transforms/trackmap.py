"""Track maps: recordings from any monitor.

Vital Recorder names each track `Device/TRACK` after the monitor that
recorded it (Philips `Intellivue/ABP_SYS`, GE `Bx50/...`, Dräger
`Infinity/...`), while the built-in feature spec knows VitalDB's devices
(`Solar8000/...`, `Primus/...`). A track map adds sources to features — before
or after the built-in ones — or replaces them:

    # YAML (or the same structure in JSON)
    name: Philips Intellivue through Vital Recorder
    features:
      HR:
        add: before          # before | after (default) | replace
        sources:
          - {track: Intellivue/ECG_HR, unit: /min}
      ETCO2:
        sources:
          - {track: Intellivue/AWAY_CO2_ET, unit: mmHg, factor: 0.133322}   # mmHg -> kPa
      Propofol_INF:
        sources:
          - {track: Pump/PROPOFOL_RATE, unit: mL/h, factor: 10, divisor: weight}   # 10 mg/mL

value = raw * factor / divisor, divisor none (default), weight (dose weight,
kg) or ibw (ideal body weight, kg); the feature's plausible range applies to
the raw value, as for the built-in sources, unless the source gives its own
`plausible: [lo, hi]` in its raw unit (a setting in litres where the
feature's range is in mL). Everything is checked before any
work: an unknown feature, key or divisor, a factor that is not a positive
number, a track listed twice.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from transforms import spec

MODES = ("before", "after", "replace")
DIVISORS = {"none": spec.PER_NONE, "weight": spec.PER_WEIGHT, "ibw": spec.PER_IBW}
_ENTRY_KEYS = {"add", "sources"}
_SOURCE_KEYS = {"track", "unit", "factor", "divisor", "plausible"}
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trackmaps")


class TrackMapError(ValueError):
    """A track map that cannot be used; the message names the entry."""


@dataclass(frozen=True)
class FeatureSources:
    feature: str
    mode: str  # before | after | replace
    sources: tuple[spec.Source, ...]


@dataclass(frozen=True)
class TrackMap:
    name: str
    features: tuple[FeatureSources, ...]

    def apply(self, base: spec.FeatureSpec = spec.DEFAULT_SPEC) -> spec.FeatureSpec:
        """The feature spec with this map's sources in place."""
        by_name = {e.feature: e for e in self.features}
        out = []
        for f in base.timeseries:
            e = by_name.get(f.name)
            if e is None:
                out.append(f)
                continue
            srcs = (e.sources if e.mode == "replace" else
                    e.sources + f.sources if e.mode == "before" else f.sources + e.sources)
            out.append(dataclasses.replace(f, sources=srcs))
        return spec.FeatureSpec(tuple(out), base.targets)

    def as_json(self) -> dict:
        """The normalised map: what the fingerprint and the metadata record,
        and what `parse` reads back (all defaults written out)."""
        inverse = {v: k for k, v in DIVISORS.items()}
        def source(s: spec.Source) -> dict:
            d = {"track": s.track, "unit": s.unit, "factor": s.factor, "divisor": inverse[s.per]}
            return d if s.plausible is None else dict(d, plausible=list(s.plausible))
        return {"name": self.name, "features": {e.feature: {"add": e.mode, "sources": [source(s) for s in e.sources]}
                                                for e in self.features}}


def shipped() -> list[str]:
    """Names of the maps that come with the package (usable as --tracks NAME)."""
    return sorted(n[:-5] for n in os.listdir(SHIPPED_DIR) if n.endswith(".yaml"))


def shipped_path(name: str) -> Optional[str]:
    """The file of a shipped map, by its name; None for any other name."""
    return os.path.join(SHIPPED_DIR, f"{name}.yaml") if name in shipped() else None


def load(value: Any) -> TrackMap:
    """A track map from a mapping (a parsed YAML or JSON document) or a
    TrackMap. Files and shipped names are read where I/O lives:
    pipeline.io.documents.load_track_map."""
    if isinstance(value, TrackMap):
        return value
    if isinstance(value, Mapping):
        return parse(value, "track map")
    raise TrackMapError(f"track map {value!r}: expected a mapping (pipeline.io.documents.load_track_map reads "
                        "files and shipped maps)")


def _positive(value, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TrackMapError(f"{where}: factor {value!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise TrackMapError(f"{where}: factor {value!r} must be a positive number")
    return v


def _range(value: Any, where: str) -> Optional[tuple[float, float]]:
    """A source's own plausible raw range [lo, hi], or None (the feature's)."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TrackMapError(f"{where}: plausible must be [lo, hi] in the source's raw unit, got {value!r}") from None
    if not lo < hi:
        raise TrackMapError(f"{where}: plausible [{lo:g}, {hi:g}] must have lo < hi")
    return (lo, hi)


def parse(doc: Any, where: str = "track map") -> TrackMap:
    """Validates a map document; TrackMapError names the offending entry."""
    if not isinstance(doc, Mapping):
        raise TrackMapError(f"{where}: expected a mapping with 'features:'")
    unknown = sorted(set(doc) - {"name", "features", "version"})
    if unknown:
        raise TrackMapError(f"{where}: unknown key(s) {unknown} (known: name, features)")
    feats = doc.get("features")
    if not isinstance(feats, Mapping) or not feats:
        raise TrackMapError(f"{where}: 'features:' must map feature names to their sources")
    known = spec.DEFAULT_SPEC.feature_names
    seen: dict[str, str] = {}
    entries = []
    for name, entry in feats.items():
        at = f"{where}: features.{name}"
        if name not in known:
            raise TrackMapError(f"{at}: unknown feature {name!r} (features: {', '.join(known)})")
        if not isinstance(entry, Mapping):
            raise TrackMapError(f"{at}: expected 'sources:' (and optionally 'add:')")
        bad = sorted(set(entry) - _ENTRY_KEYS)
        if bad:
            raise TrackMapError(f"{at}: unknown key(s) {bad} (known: add, sources)")
        mode = entry.get("add", "after")
        if mode not in MODES:
            raise TrackMapError(f"{at}: add {mode!r} must be one of {', '.join(MODES)}")
        raw_sources = entry.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            raise TrackMapError(f"{at}: 'sources:' must be a non-empty list")
        sources = []
        for i, src in enumerate(raw_sources):
            sat = f"{at}.sources[{i}]"
            if not isinstance(src, Mapping):
                raise TrackMapError(f"{sat}: expected a mapping with track, unit, factor, divisor")
            bad = sorted(set(src) - _SOURCE_KEYS)
            if bad:
                raise TrackMapError(f"{sat}: unknown key(s) {bad} (known: {', '.join(sorted(_SOURCE_KEYS))})")
            track = str(src.get("track") or "").strip()
            if "/" not in track or track.startswith("/") or track.endswith("/"):
                raise TrackMapError(f"{sat}: track {src.get('track')!r} must be a full Device/TRACK name")
            if "unit" not in src:
                raise TrackMapError(f"{sat} ({track}): 'unit' (the raw unit the device records) is missing")
            divisor = str(src.get("divisor", "none")).strip().lower()
            if divisor not in DIVISORS:
                raise TrackMapError(f"{sat} ({track}): unknown divisor {src.get('divisor')!r} "
                                    f"(one of: {', '.join(DIVISORS)})")
            if track in seen:
                raise TrackMapError(f"{sat}: track {track} is listed twice (also under {seen[track]})")
            seen[track] = f"features.{name}"
            sources.append(spec.Source(track, str(src["unit"]), _positive(src.get("factor", 1.0), f"{sat} ({track})"),
                                       DIVISORS[divisor], _range(src.get("plausible"), f"{sat} ({track})")))
        builtin = {s.track for s in spec.DEFAULT_SPEC.feature(name).sources}
        if mode != "replace":
            dup = [s.track for s in sources if s.track in builtin]
            if dup:
                raise TrackMapError(f"{at}: track {dup[0]} is listed twice (it is a built-in source of {name}; "
                                    "use add: replace to reorder the built-in sources)")
        entries.append(FeatureSources(name, mode, tuple(sources)))
    return TrackMap(str(doc.get("name") or ""), tuple(entries))
