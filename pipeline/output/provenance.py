"""Where a dataset came from: the code that made it and the inputs it was
made from, as the metadata and the quality report record them."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from collections import Counter
from importlib import metadata as importlib_metadata
from typing import Optional

from pipeline.output.contracts import DoneMarker

PACKAGE = "master-poc-preprocessing"
VERSIONED = (PACKAGE, "apache-beam", "tfx-bsl", "tensorflow-metadata", "vitaldb", "numpy", "pandas", "pyarrow",
             "boto3", "deflate")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return None


def commit() -> Optional[str]:
    """The commit the code was built from: the image's build argument
    (MASTER_POC_COMMIT), else the git checkout the package runs from."""
    env = os.environ.get("MASTER_POC_COMMIT")
    if env and env != "unknown":
        return env
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pipeline/output/ -> the root
    if not os.path.exists(os.path.join(here, ".git")):  # a folder, or a file in a git worktree or submodule
        return None
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def versions() -> dict:
    """Python's and the libraries' versions."""
    return {"python": platform.python_version(), **{d: _version(d) for d in VERSIONED}}


def build(done: dict[int, DoneMarker], source: Optional[dict] = None) -> dict:
    """The provenance block of the metadata: package, its commit, library
    versions, where the inputs came from (a named dataset: its URL and
    version), the clinical table(s) and every input file's identity."""
    tables = Counter(json.dumps(m.clinical.to_json(), sort_keys=True) for m in done.values() if m.clinical)
    return {
        "package": {"name": PACKAGE, "version": _version(PACKAGE), "commit": commit()},
        "versions": versions(),
        "source": source,
        # One entry per distinct table the committed cases were made with (normally one).
        "clinical": [dict(json.loads(t), cases=n) for t, n in tables.most_common()],
        "inputs": {str(c): m.input.to_json() for c, m in sorted(done.items()) if m.input},
        "input_identity": "a local file: size, mtime and crc32c of the whole file; an object store's or web "
                          "server's: size and etag (else last_modified) as the store states them, and "
                          "crc32c_read of the bytes read (bytes_read; the rest was never transferred)",
    }
