"""A stand-in for VitalDB's open-data web API on loopback, with injected faults.

Serves what the `vitaldb` library 1.7.2 asks the real API for:

    GET/HEAD /<version>/<caseid>.vital   a case file (packed, as 1.0.1 serves them), with
                                         Content-Length, ETag, Last-Modified, Accept-Ranges;
                                         Range requests answered 206 (unless ranges=False)
    GET      /cases                      the clinical table, a CSV sent Content-Encoding: gzip
    GET      /trks                       the track table (caseid,tname,tid), sent the same way

from a folder of generated files (`<id:04d>.vital` or `<id>.vital`,
clinical_data.csv and trks.csv; without a trks.csv, /trks lists the tracks
of the .vital files it serves, as the real API lists every file's). Faults
are planned per path, in order, for the next requests of that path: "503:2"
(503 with Retry-After: 2), "429:0", "500", "cut:N" (the status line and
headers of the full answer, then N body bytes and the connection closed),
"hang:S" (nothing for S seconds, then the connection closed), "slow:S" (the
answer after S seconds), "drop" (the connection closed before any answer). It counts requests and
body bytes sent per path, so a test can say exactly what was transferred.

    python tests/webstandin.py --root data/sample --port 8765   # then: MASTER_POC_VITALDB_API=http://127.0.0.1:8765
"""
from __future__ import annotations

import argparse
import email.utils
import gzip
import hashlib
import os
import re
import socket
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler

import vitaldb
from loopback import LoopbackServer

from pipeline.tools import sample

_CASE = re.compile(r"^/(?:(?P<version>[^/]+)/)?(?P<id>\d+)\.vital$")
_FILE = re.compile(r"^(\d+)\.vital$")
# The tables the API sends as gzip-encoded CSV, and the sample's file of each.
TABLES = {"/cases": "clinical_data.csv", "/trks": sample.TRKS_FILE}
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class StandIn(LoopbackServer):
    def __init__(self, root: str, version: str = "1.0.1", ranges: bool = True, port: int = 0,
                 sizes: bool = True, head: bool = True, redirect: bool = False):
        self.root = root
        self.version = version
        self.ranges = ranges  # answer Range requests (206)
        self.sizes = sizes  # send Content-Length (without it: bodies end when the connection closes)
        self.head = head  # answer HEAD (else 405)
        self.redirect = redirect  # case files redirect (302) to /files/..., as a mirror or CDN would
        self.lock = threading.Lock()
        self.faults: dict[str, list[str]] = defaultdict(list)
        self.requests: dict[str, int] = defaultdict(int)
        self.sent: dict[str, int] = defaultdict(int)  # body bytes per path
        self.log: list[tuple[str, str, str]] = []  # (method, path, what was answered)
        self._cache: dict = {}
        self.active = 0  # requests being answered now
        self.most_active = 0  # the most at once
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_HEAD(self):
                standin._serve(self, head=True)

            def do_GET(self):
                standin._serve(self, head=False)

        super().__init__(Handler, port)

    # ---- control
    def plan(self, path: str, *faults: str) -> None:
        """The next requests of `path` get these faults, in order."""
        with self.lock:
            self.faults[path].extend(faults)

    def sent_for(self, case_id: int) -> int:
        return self.sent[f"/{self.version}/{case_id}.vital"]

    # ---- serving
    def _file(self, path: str):
        if path in TABLES:
            local = os.path.join(self.root, TABLES[path])
            return local if os.path.exists(local) or path != "/trks" else self.root  # the folder: derived
        m = _CASE.match(path)
        if not m or m.group("version") != self.version:
            return None
        cid = int(m.group("id"))
        for name in (f"{cid:04d}.vital", f"{cid}.vital"):
            if os.path.exists(os.path.join(self.root, name)):
                return os.path.join(self.root, name)
        return None

    def _content(self, local: str):
        """(bytes, ETag, modification time) of a file, read and hashed once
        per version (a real server does not hash a file per request either);
        of the folder: the track table of its .vital files."""
        if os.path.isdir(local):
            return self._derived_trks(local)
        st = os.stat(local)
        key = (local, st.st_mtime_ns, st.st_size)
        with self.lock:
            hit = self._cache.get(key)
        if hit is None:
            with open(local, "rb") as fh:
                data = fh.read()
            hit = (data, '"' + hashlib.md5(data).hexdigest() + '"', st.st_mtime)
            with self.lock:
                self._cache[key] = hit
        return hit

    def _derived_trks(self, folder: str):
        """The track table of a folder's .vital files (each file's track
        names, read from its header), made once per state of the folder. A
        file vitaldb cannot read lists nothing: its tracks are unknown here."""
        files = sorted((int(m.group(1)), os.path.join(folder, n)) for n in os.listdir(folder)
                       for m in [_FILE.match(n)] if m)
        stats = [os.stat(p) for _, p in files]
        key = ("trks", tuple((p, s.st_mtime_ns, s.st_size) for (_, p), s in zip(files, stats)))
        with self.lock:
            hit = self._cache.get(key)
        if hit is None:
            rows = []
            for cid, path in files:
                try:
                    names = vitaldb.VitalFile(path, header_only=True).get_track_names()
                except Exception:  # a broken file: vitaldb's errors are of many kinds
                    names = []
                rows += sample.track_rows(cid, names)
            data = sample.trks_csv(rows)
            hit = (data, '"' + hashlib.md5(data).hexdigest() + '"', max((s.st_mtime for s in stats), default=0.0))
            with self.lock:
                self._cache[key] = hit
        return hit

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            self._answer(h, head)
        finally:
            with self.lock:
                self.active -= 1

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = h.path.split("?", 1)[0]
        with self.lock:
            self.requests[path] += 1
            fault = self.faults[path].pop(0) if self.faults[path] else None
        kind, _, arg = (fault or "").partition(":")
        with self.lock:
            self.log.append((h.command, path, fault or "ok"))
        if kind == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if kind == "slow":
            time.sleep(float(arg))  # a slow server: the answer comes, late
        if kind == "hang":
            time.sleep(float(arg))  # a server that stalls (the client's read timeout must fire)
            h.close_connection = True
            return
        if kind in ("503", "429", "500", "errcut"):
            body = f"fault {kind}".encode() if kind != "errcut" else b"<html>error page</html>" * 200
            h.send_response(503 if kind == "errcut" else int(kind))
            if arg and kind != "errcut":
                h.send_header("Retry-After", arg)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if not head:
                h.wfile.write(body[:int(arg)] if kind == "errcut" else body)  # errcut:N: an error page cut
            if kind == "errcut":
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        if head and not self.head:
            h.send_response(405)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if self.redirect and _CASE.match(path):
            h.send_response(302)
            h.send_header("Location", "/files" + path)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        local = self._file(path[len("/files"):] if path.startswith("/files/") else path)
        if local is None:
            body = b"not found"
            h.send_response(404)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if not head:
                h.wfile.write(body)
            return
        data, etag, mtime = self._content(local)
        headers = {"ETag": etag, "Last-Modified": email.utils.formatdate(mtime, usegmt=True)}
        status = 200
        if path in TABLES:  # VitalDB sends its tables gzip-encoded
            data = gzip.compress(data)
            headers.update({"Content-Type": "text/csv", "Content-Encoding": "gzip"})
        else:
            headers["Content-Type"] = "application/octet-stream"
            if self.ranges and self.sizes:
                headers["Accept-Ranges"] = "bytes"
                m = _RANGE.match(h.headers.get("Range", ""))
                if m:
                    start = int(m.group(1))
                    end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                    headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                    data, status = data[start:end + 1], 206
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if self.sizes or path in TABLES:
            h.send_header("Content-Length", str(len(data)))
        else:  # the body ends when the connection closes
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        if head:
            return
        if kind == "cut":
            data = data[:int(arg)]
        try:
            for i in range(0, len(data), 64 * 1024):  # counted as written: a client may hang up early
                h.wfile.write(data[i:i + 64 * 1024])
                with self.lock:
                    self.sent[path] += len(data[i:i + 64 * 1024])
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        if kind == "cut":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="folder with <id>.vital files, clinical_data.csv and trks.csv")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    with StandIn(args.root, port=args.port) as s:
        print(f"serving {args.root} as VitalDB's API at {s.url} (set MASTER_POC_VITALDB_API={s.url})", flush=True)
        try:
            s.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
