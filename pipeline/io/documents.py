"""YAML and JSON documents the user hands in (config files, track maps),
read through Beam's FileSystems (local, s3://, gs://)."""
from __future__ import annotations

import json
import os
from typing import Any


class DocumentError(ValueError):
    """A document that cannot be read or parsed; the message names it."""


def read_document(path: str, what: str) -> Any:
    """The parsed content of a YAML file (JSON when the name ends in .json);
    `what` names it in errors ("--config run.yaml", "track map x.yaml")."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            text = fh.read().decode("utf-8")
    except Exception as e:  # any filesystem's "cannot open", or not UTF-8
        raise DocumentError(f"{what}: cannot read it ({e})") from None
    try:
        if path.endswith(".json"):
            return json.loads(text)
        import yaml
        return yaml.safe_load(text)
    except Exception as e:  # a YAML or JSON syntax error
        raise DocumentError(f"{what}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from None


def load_track_map(value: Any):
    """A track map (transforms.trackmap.TrackMap) from a path (YAML or JSON,
    any filesystem), the name of a shipped map, a mapping or a TrackMap;
    TrackMapError names the file."""
    from transforms import trackmap
    if not isinstance(value, str):
        return trackmap.load(value)
    path = value.strip()
    if not os.path.exists(path):
        path = trackmap.shipped_path(path) or path
    try:
        doc = read_document(path, f"track map {path}")
    except DocumentError as e:
        raise trackmap.TrackMapError(str(e)) from None
    return trackmap.parse(doc, f"track map {path}")
