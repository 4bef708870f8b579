"""A real S3-compatible server on loopback (moto's server mode) and a
fault-injecting HTTP proxy in front of it. Clients talk HTTP to them; nothing
in boto3/botocore is patched."""
from __future__ import annotations

import http.client
import os
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler

from loopback import LoopbackServer

REGION = "us-east-1"
KEY, SECRET = "testing", "testing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def beam_s3_args(endpoint: str) -> list[str]:
    return [f"--s3_endpoint_url={endpoint}", f"--s3_region_name={REGION}",
            f"--s3_access_key_id={KEY}", f"--s3_secret_access_key={SECRET}"]


def s3_env() -> dict:
    return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": REGION}


def boto_client(endpoint: str, service: str = "s3"):
    import boto3
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY,
                        aws_secret_access_key=SECRET)


def upload_dir(client, local: str, bucket: str, prefix: str) -> str:
    for name in sorted(os.listdir(local)):
        path = os.path.join(local, name)
        if os.path.isfile(path):
            client.upload_file(path, bucket, f"{prefix}/{name}")
    return f"s3://{bucket}/{prefix}"


def sample_on_s3(endpoint: str, local: str, bucket: str, n: int, duration_s: int) -> str:
    """Generates cases 1..n into `local`, creates `bucket` and uploads them under raw/."""
    from pipeline.tools import sample
    sample.write_sample(local, list(range(1, n + 1)), duration_s=duration_s)
    client = boto_client(endpoint)
    client.create_bucket(Bucket=bucket)
    return upload_dir(client, local, bucket, "raw")


def download_prefix(client, bucket: str, prefix: str, local: str, suffix: str = "") -> list[str]:
    paths = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(suffix):
                dst = os.path.join(local, obj["Key"].replace("/", "__"))
                client.download_file(bucket, obj["Key"], dst)
                paths.append(dst)
    return sorted(paths)


_ERRORS = {
    500: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError</Code>"
         b"<Message>We encountered an internal error. Please try again.</Message></Error>",
    503: b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
         b"<Message>Please reduce your request rate.</Message></Error>",
}


class FaultProxy(LoopbackServer):
    """HTTP reverse proxy answering a share of requests with 500, 503
    SlowDown or a dropped connection; the rest go to the upstream server.
    Reads (GET/HEAD) may also be dropped after the upstream answered."""

    def __init__(self, upstream_port: int, rate: float = 0.1, seed: int = 7):
        self.upstream_port = upstream_port
        self.rate = rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "500": 0, "503": 0, "drop": 0, "drop_after": 0}
        self.sent: dict[str, int] = {}  # body bytes of GET answers passed on, per path
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(size + 2)
                        raw += chunk
                        if size == 0:
                            # trailers until a blank line
                            while chunk not in (b"\r\n", b""):
                                chunk = self.rfile.readline()
                                raw += chunk
                            return raw
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _drop(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

            def _handle(self):
                body = self._body()
                fault = proxy._choose(self.command)
                if fault == "drop":
                    return self._drop()
                if fault in ("500", "503"):
                    data = _ERRORS[int(fault)]
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items()}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "drop_after":
                    return self._drop()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # HEAD has no body but tells the object's length.
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                if self.command == "GET":
                    path = self.path.split("?", 1)[0]
                    with proxy.lock:
                        proxy.sent[path] = proxy.sent.get(path, 0) + len(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        super().__init__(Handler)

    def _choose(self, method: str):
        with self.lock:
            self.counts["requests"] += 1
            if self.rng.random() >= self.rate:
                return None
            kinds = ["500", "503", "drop"] + (["drop_after"] if method in ("GET", "HEAD") else [])
            k = self.rng.choice(kinds)
            self.counts[k] += 1
            return k

    @property
    def faults(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "requests")

    @property
    def endpoint(self) -> str:
        return self.url
