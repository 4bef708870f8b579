"""An input file's identity: one type for what says which file a case was
made from, and whether it is still that file.

What a stat tells (no read): the path and size, and for a local file its
mtime, for an object store its ETag, for a web server its ETag (else its
Last-Modified). What reading it adds: the CRC-32C of the whole local file;
for a remote one, the CRC-32C of the bytes read (`crc32c_read`), how many
(`bytes_read`; the rest was never transferred) and the requests and retries
that took. A done marker keeps it (`input`), the metadata's provenance lists it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional


def known_fields(cls, d: Mapping) -> dict:
    """The entries of `d` that are fields of the dataclass `cls`: what a record's
    from_json reads (a key written by another version is ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


# The keys a stat gives, in the order `same_file` compares them.
_STAT_FIELDS = ("path", "bytes", "mtime", "etag", "last_modified")


@dataclass(frozen=True)
class FileIdentity:
    path: str
    bytes: Optional[int] = None
    mtime: Optional[float] = None  # a local file's
    etag: Optional[str] = None  # an object store's, or a web server's
    last_modified: Optional[str] = None  # a web server's, where it sends no ETag
    crc32c: Optional[str] = None  # of the whole file, as read (local files)
    bytes_read: Optional[int] = None  # a remote file's: what reading it cost
    requests: Optional[int] = None
    retries: Optional[int] = None
    crc32c_read: Optional[str] = None  # of the bytes read (a remote file is not read to its end)

    @property
    def remote(self) -> bool:
        """Read through a transfer (bytes_read counted), not from a local disk."""
        return self.bytes_read is not None

    def read(self, **what: object) -> "FileIdentity":
        """This identity with what reading the file added (crc32c, or the transfer's counts and crc32c_read)."""
        return dataclasses.replace(self, **what)

    def same_file(self, current: "FileIdentity") -> bool:
        """Whether the file a case was committed from (self) is still the
        same file, judged by what a stat of it now (`current`) tells."""
        return all(getattr(self, k) == getattr(current, k) for k in _STAT_FIELDS if getattr(current, k) is not None)

    def content_changed(self, new: "FileIdentity") -> bool:
        """Whether two identities of a file name different content: the whole
        file's CRC-32C where both have it (local files), else the ETag, else
        size and Last-Modified (a touched local file is not a change)."""
        for keys in (("crc32c",), ("etag",), ("bytes", "last_modified")):
            if all(getattr(self, k) is not None and getattr(new, k) is not None for k in keys):
                return any(getattr(self, k) != getattr(new, k) for k in keys)
        return True

    def to_json(self) -> dict:
        """The fields it has, in declaration order (a marker's `input`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def from_json(d: Optional[Mapping]) -> Optional["FileIdentity"]:
        """None for a marker without one; keys it does not know are ignored."""
        return FileIdentity(**known_fields(FileIdentity, d)) if d else None


@dataclass(frozen=True)
class TableIdentity:
    """The clinical table a run read: where, its size and SHA-256, the
    format it was read in (separator, decimal mark, encoding) and what the
    split is keyed on ("subjectid" where it has that column, else "caseid")."""

    path: str
    bytes: int
    sha256: str
    format: Optional[dict] = None  # None: recorded by a version before contract 1.2
    split_key: Optional[str] = None

    @property
    def by_patient(self) -> bool:
        return self.split_key == "subjectid"

    def to_json(self) -> dict:
        """The fields it has (an identity recorded before 1.2 has no format or split key)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @staticmethod
    def from_json(d: Optional[Mapping]) -> Optional["TableIdentity"]:
        """None for a marker or metadata without one."""
        return TableIdentity(**known_fields(TableIdentity, d)) if d else None
