"""Where a run's cases come from, behind one small type.

    Source.for_location("data/vital-files")      a local folder
    Source.for_location("s3://bucket/vital")     an object store (any Beam filesystem: s3://, gs://)
    Source.for_location("vitaldb")               VitalDB's open dataset, from its web API
    Source.for_location("https://host/files")    any web server with <caseid>.vital files

Each can list its cases (a web server cannot: the clinical table's case ids
are used), find a case's file (`<id:04d>.vital`, then `<id>.vital`; on a
web server `<id>.vital` first, as VitalDB names them), tell the file's
identity without reading it (size and mtime; the store's ETag; the server's
ETag, else size and Last-Modified), open it as a stream that the parser reads
as it arrives (remote files block by block, see pipeline.io.remote), and
name its default clinical table.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from pipeline.io import remote, s3
from pipeline.io.identity import FileIdentity
from transforms.case_ids import case_file_candidates, case_id_from_path

_LOG = logging.getLogger(__name__)

VITALDB = "vitaldb"  # --input vitaldb: the open dataset, at the vitaldb library's URL and version
CLINICAL_FILE = "clinical_data.csv"  # a folder's clinical table, by default
# A mirror of VitalDB's API (or a stand-in for tests): replaces the library's api_url.
VITALDB_API_ENV = "MASTER_POC_VITALDB_API"


class SourceError(ValueError):
    """An input that cannot be used; said before any work."""


def is_web(path: str) -> bool:
    return path.lower().startswith(("http://", "https://"))


def is_local(path: str) -> bool:
    if is_web(path):
        return False
    return isinstance(FileSystems.get_filesystem(path), LocalFileSystem)


def vitaldb_dataset() -> tuple[str, str]:
    """(API base URL, dataset version) of VitalDB's open dataset, from the
    vitaldb library's constants (the API URL can be overridden, see
    VITALDB_API_ENV)."""
    import vitaldb.dataset
    api = os.environ.get(VITALDB_API_ENV) or vitaldb.dataset.api_url
    return api.rstrip("/"), vitaldb.dataset.DATASET_VERSION


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


@dataclass(frozen=True)
class Source:
    """A location of `.vital` files (see the module docstring)."""

    location: str  # resolved: a folder, a prefix, or a base URL
    web: remote.WebOptions = field(default_factory=remote.WebOptions)
    clinical: Optional[str] = None  # its default clinical table (None: <location>/clinical_data.csv)
    dataset: Optional[str] = None  # a named dataset ("VitalDB open dataset 1.0.1")
    version: Optional[str] = None  # its version (vitaldb.dataset.DATASET_VERSION)
    track_list: Optional[str] = None  # its track table (VitalDB's API: /trks), for the cohort's require

    @staticmethod
    def for_location(location: str, web: Optional[remote.WebOptions] = None) -> "Source":
        web = web or remote.WebOptions()
        if location.strip().lower() == VITALDB:
            api, version = vitaldb_dataset()
            return Source(f"{api}/{version}", web, clinical=f"{api}/cases", dataset=f"VitalDB open dataset {version}",
                          version=version, track_list=f"{api}/trks")
        return Source(location, web)

    # ---- what it is
    @property
    def kind(self) -> str:
        if is_web(self.location):
            return "web"
        return "folder" if is_local(self.location) else "object store"

    def describe(self) -> dict:
        d = {"kind": self.kind, "location": self.location, "clinical": self.default_clinical()}
        if self.dataset:
            d.update(dataset=self.dataset, version=self.version)
        return d

    def default_clinical(self) -> str:
        return self.clinical or _join(self.location, CLINICAL_FILE)

    # ---- its cases
    def list_case_ids(self) -> Optional[list[int]]:
        """The case ids of its files, or None where files cannot be listed (a web server)."""
        if self.kind == "web":
            return None
        paths = FileSystems.match([_join(self.location, "*.vital")])[0].metadata_list
        ids = {case_id_from_path(m.path) for m in paths}
        return sorted(i for i in ids if i is not None)

    def candidates(self, case_id: int) -> list[str]:
        paths = case_file_candidates(self.location, case_id)
        return paths[::-1] if self.kind == "web" else paths

    def stat(self, path: str, transfer: Optional[remote.Transfer] = None) -> Optional[FileIdentity]:
        """The file's identity without reading it, or None if it does not
        exist (a web server's HEAD requests are counted in `transfer`)."""
        kind = self.kind
        if kind == "web":
            return remote.http_client(self.web).head(path, transfer)
        if kind == "folder":
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return None
            return FileIdentity(path, st.st_size, mtime=st.st_mtime)
        if path.startswith("s3://"):
            return _s3_head(path)
        if not FileSystems.exists(path):
            return None
        meta = FileSystems.match([path])[0].metadata_list[0]
        return FileIdentity(path, meta.size_in_bytes, etag=FileSystems.checksum(path))

    def locate(self, case_id: int, transfer: Optional[remote.Transfer] = None) -> tuple[str, FileIdentity]:
        """(path, identity) of the case's file; LookupError naming where it looked."""
        tried = self.candidates(case_id)
        for path in tried:
            ident = self.stat(path, transfer)
            if ident is not None:
                return path, ident
        raise LookupError("no " + " or ".join(p.rsplit("/", 1)[-1] for p in tried) + f" in {self.location}")

    def open(self, identity: FileIdentity, transfer: Optional[remote.Transfer] = None):
        """The file as the stream the parser reads (`name`: the URL vitaldb is
        given; `head`: its first bytes; `finish_identity(hasher)`: what the
        read adds to its identity): a local file, or a remote one read as it
        is parsed (pipeline.io.remote, which counts the cost in `transfer`)."""
        path = identity.path
        kind = self.kind
        transfer = transfer if transfer is not None else remote.Transfer()
        if kind == "folder":
            return LocalFile(path)
        if kind == "web":
            return remote.open_web(remote.http_client(self.web), identity, transfer)
        if path.startswith("s3://"):
            return remote.open_s3(_s3_client(), identity, transfer)
        raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
        return remote.CountingReader(raw, path, transfer)


def preflight(paths: dict, web: remote.WebOptions) -> None:
    """Refuses at start ({flag: path}, SourceError naming the flag) an input
    or a clinical table on a web server that does not answer, as an
    unreachable S3 endpoint is refused."""
    for flag, path in paths.items():
        if path is None:
            continue
        url = Source.for_location(path, web).location if flag == "--input" else path
        if is_web(url):
            try:
                check_reachable(url, web)
            except SourceError as e:
                raise SourceError(f"{flag} {path}: {e}") from None


class LocalFile(io.RawIOBase):
    """A local case file as a stream: its identity gets the CRC-32C of the
    whole file (the rest the parse left unread is read afterwards: cheap on a
    local disk)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        # vitaldb streams what it is given as a URL (with a host) from our urlopen
        self.name = "file://localhost" + os.path.abspath(path)
        self._fh = open(path, "rb", buffering=0)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._fh.readinto(b)

    def read(self, n: int = -1) -> bytes:
        return self._fh.read(n)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    @property
    def head(self) -> bytes:
        """The file's first bytes (a failure path: names what the file is)."""
        with open(self.path, "rb") as fh:
            return fh.read(remote.HEAD_BYTES)

    def finish_identity(self, hasher) -> dict:
        return {"crc32c": hasher.finish(self.path)}

    def close(self) -> None:
        self._fh.close()
        super().close()


def check_reachable(url: str, web: remote.WebOptions) -> None:
    """SourceError unless the server answers (any HTTP status will do)."""
    u = urlsplit(url)
    if u.scheme == "http" and not remote.is_loopback(u.hostname or ""):
        _LOG.warning("%s is plain http: nothing is encrypted or authenticated on the way; use https", url)
    client = remote.HttpClient(remote.WebOptions(timeout_s=min(web.timeout_s, 10.0), max_attempts=2,
                                                 backoff_s=0.2, connections=1))
    try:
        client.request("HEAD", url, ok=range(100, 600), missing=())
    except remote.TransferError as e:
        raise SourceError(f"cannot reach {u.scheme}://{u.netloc}: {e}") from None
    finally:
        client.close()


def read_document(path: str, web: Optional[remote.WebOptions] = None) -> bytes:
    """A whole small file (a clinical table) from any location; a web
    server's gzip Content-Encoding is decoded."""
    if is_web(path):
        return remote.http_client(web or remote.WebOptions()).get_bytes(path)
    with FileSystems.open(path, compression_type=CompressionTypes.AUTO) as fh:
        return fh.read()


# ---- S3: Beam's own client configuration, bounded range reads -------------------

def _s3_client():
    """The boto3 client Beam's S3 filesystem uses in this process (built from
    the same pipeline options: endpoint, region, credentials): one cache of
    clients per process, pipeline.io.s3's, which Beam's wrapper hands out."""
    from apache_beam.io.aws.clients.s3 import boto3_client
    from apache_beam.options.pipeline_options import PipelineOptions
    s3.share_boto3_clients()
    return boto3_client.Client(options=FileSystems._pipeline_options or PipelineOptions([])).client


def _s3_head(path: str) -> Optional[FileIdentity]:
    from botocore.exceptions import ClientError
    bucket, key = path[len("s3://"):].split("/", 1)
    try:
        r = _s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return FileIdentity(path, int(r["ContentLength"]), etag=r["ETag"])
