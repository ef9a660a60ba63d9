"""A real S3-compatible server on loopback for tests: moto in server mode, in its own process.

It runs in a separate process because delta-rs calls that hold the GIL would otherwise stall a
server thread in the test process. Optionally a small proxy in front of it fails some requests
once with a 503 (S3's SlowDown), to check that every engine retries transient errors.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               # never ask an instance metadata service for credentials: nothing but loopback here
               "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1, stopped by :meth:`stop`."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("moto server did not start within 60 s")

    def stop(self) -> None:
        _terminate(self.proc)
        self._log.close()


class _Counts:
    failed = 0
    forwarded = 0


def serve_flaky_proxy(port: int, target_port: int, every: int) -> None:
    """Forward HTTP on ``port`` to ``target_port``; every ``every``-th request is answered with a 503
    SlowDown instead (a client's retry of it is a new request and goes through), so a client that
    does not retry fails. ``GET /__proxy_stats`` says how many requests were failed and forwarded."""
    proxy = _Counts()
    count = {"n": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _handle(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = self._read_chunked()
            if self.path == "/__proxy_stats":
                msg = f'{{"failed": {proxy.failed}, "forwarded": {proxy.forwarded}}}'.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
            with lock:
                count["n"] += 1
                fail = count["n"] % every == 0
            if fail:
                proxy.failed += 1
                msg = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                       b"<Message>Please reduce your request rate.</Message></Error>")
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
            drop = {"transfer-encoding", "expect", "connection", "keep-alive"}
            headers = {k: v for k, v in self.headers.items() if k.lower() not in drop}
            headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection("127.0.0.1", target_port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body if body or self.command in {"PUT", "POST"}
                             else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            finally:
                conn.close()
            proxy.forwarded += 1
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in {"transfer-encoding", "connection", "content-length"}:
                    self.send_header(k, v)
            # a HEAD's Content-Length is the object's size, not that of the (empty) body
            length = resp.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _read_chunked(self) -> bytes:
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.handle_error = lambda request, client_address: None  # clients closing idle connections
    server.serve_forever()


class FlakyProxy:
    """:func:`serve_flaky_proxy` in its own process, in front of the server on ``target_port``."""

    def __init__(self, target_port: int, every: int = 5) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.port), str(target_port), str(every)])
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("flaky proxy did not start") from None
                time.sleep(0.1)

    def stats(self) -> dict[str, int]:
        import json

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/__proxy_stats")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self) -> None:
        _terminate(self.proc)


def _terminate(proc: subprocess.Popen) -> None:
    """Stop a server process: politely, then for sure."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def env_for(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point every engine at ``endpoint``."""
    return {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}


if __name__ == "__main__":
    serve_flaky_proxy(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
