"""YAML and JSON documents the user hands in (config files, track maps),
read through Beam's FileSystems (local, s3://, gs://)."""
from __future__ import annotations

import json
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
