"""A local Cloud Storage for tests and hand-run trainers: gcp-storage-emulator behind a proxy that adds what the
emulator lacks and what a real bucket does to a run now and then.

The emulator serves the JSON API that tensorstore (Orbax's array store) and gcsfs (etils.epath's `gs://`) speak,
but it ignores preconditions: two "create if absent" writes both succeed, which hides exactly the races that the
workdir lock and Orbax's commit protocol rely on Cloud Storage to settle. It also leaves out two things tensorstore
reads: the `x-goog-generation` header of a download (without it every read reports generation 0, which tensorstore
refuses as a condition) and the `startOffset`/`endOffset` of a listing (without them a listing, and so a
`delete_range`, covers the whole bucket). The proxy in front of it, on its own port:

- enforces `ifGenerationMatch`, `ifGenerationNotMatch`, `ifMetagenerationMatch` and `ifMetagenerationNotMatch` on
  object uploads (media, multipart, resumable), reads and deletes, answering 412 (304 for a read whose "not match"
  condition fails) as Cloud Storage does. Every request on one object runs under that object's lock, so checking
  the condition against the emulator's metadata and forwarding the request are one step: of two concurrent
  conditional creates exactly one succeeds;
- adds the generation headers to downloads and filters listings to their offsets;
- injects faults on a seeded share of requests (`Faults`): a 503, a dropped connection, a slow answer, so that
  the clients' retries are exercised the way a busy bucket exercises them;
- counts requests, faults and retries (`GcsServer.counts`).

Object names in request paths must be percent-encoded (`a%2Fb`), as Cloud Storage requires and both clients do;
requests the proxy does not recognise as object requests are forwarded unchanged.

`serve()` runs both for a test (tests/conftest.py's `gcs` fixture); `python -m tests.gcs_server` runs them until
killed and prints the environment a trainer needs to use them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import email.parser
import http.client
import http.server
import importlib.util
import json
import logging
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import IO
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

logger = logging.getLogger(__name__)

FAULT_KINDS = ("503", "drop", "slow", "403")
"""What `Faults` can inject: an HTTP 503 with a Cloud Storage error body (nothing forwarded), a connection closed
after the request was read (nothing forwarded, no answer), an answer delayed by `Faults.slow_s`, an HTTP 403
(access refused, which clients do not retry: a storage failure that ends a read at once)."""
RANDOM_KINDS = ("503", "drop", "slow")
"""The kinds a random share of requests gets by default: what a busy or flaky Cloud Storage does."""
HOST = "127.0.0.1"
"""Both servers listen here, not on "localhost": clients that try IPv6 first would otherwise knock on ::1 first."""
CONDITIONS = ("ifGenerationMatch", "ifGenerationNotMatch", "ifMetagenerationMatch", "ifMetagenerationNotMatch")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
}
"""Headers that belong to one connection (RFC 9110 7.6.1), not forwarded: Content-Length is set anew, and the
proxy answers `Expect: 100-continue` itself (http.server does)."""
_OBJECT = re.compile(r"^(?:/download)?/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<name>[^/]+)$")
_UPLOAD = re.compile(r"^/upload/storage/v1/b/(?P<bucket>[^/]+)/o$")
_LISTING = re.compile(r"^/storage/v1/b/(?P<bucket>[^/]+)/o$")
_MOVE = re.compile(r"^/storage/v1/b/[^/]+/o/[^/]+/moveTo/")
"""Cloud Storage's one-request move, which the emulator lacks: gcsfs tries it first and falls back to copy and
delete, but retries the emulator's 501 for half a minute before; refused at once with a 400, it falls back at
once."""
COUNTED = ("requests", "faults", *FAULT_KINDS, "retries", "precondition_failed")
"""The keys of `GcsServer.counts`."""
_CACHE_BUSTER = "tensorstore"
"""tensorstore adds `tensorstore=<random>` to every read, a retry included; a retry is recognised without it."""


@dataclasses.dataclass(frozen=True)
class Faults:
    """A share `rate` of requests (0 = none, 1 = all) gets a fault drawn from `kinds`; `seed` makes the sequence
    reproducible for the same order of requests."""

    rate: float = 0.05
    kinds: tuple[str, ...] = RANDOM_KINDS
    slow_s: float = 2.0
    seed: int = 0
    names: str | None = None
    """A regular expression: only requests whose decoded path and query match it can get a fault (e.g. one
    checkpoint's objects); None: every request."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate {self.rate} is not in [0, 1]")
        if not self.kinds or set(self.kinds) - set(FAULT_KINDS):
            raise ValueError(f"fault kinds {self.kinds!r}: choose from {FAULT_KINDS}")


@dataclasses.dataclass
class _Request:
    """A request as the proxy buffers it: `target` is the path with its query."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclasses.dataclass
class _Response:
    """A response as the proxy buffers it (the emulator's, or one the proxy makes up)."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


def _error(code: int, reason: str, message: str) -> _Response:
    """A Cloud Storage JSON API error, the shape clients parse (`error.code`, `error.errors[].reason`)."""
    error = {"code": code, "message": message, "errors": [{"domain": "global", "reason": reason, "message": message}]}
    headers = [("Content-Type", "application/json; charset=UTF-8")]
    return _Response(code, HTTPStatus(code).phrase, headers, json.dumps({"error": error}).encode())


def _free_port() -> int:
    """A port nothing listens on now; the emulator takes it a moment later (`_start_emulator` retries a race)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _call(port: int, request: _Request) -> _Response:
    """`request` sent to the server on `port`, its answer read whole. A Host header in `request` is kept: the
    emulator builds resumable-upload and media links from it, and those must point at the proxy."""
    connection = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        has_host = any(key.lower() == "host" for key, _ in request.headers)
        connection.putrequest(request.method, request.target, skip_host=has_host, skip_accept_encoding=True)
        for key, value in request.headers:
            if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                connection.putheader(key, value)
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            connection.putheader("Content-Length", str(len(request.body)))
        connection.endheaders(request.body or None)
        answer = connection.getresponse()
        headers = [(key, value) for key, value in answer.getheaders() if key.lower() not in _HOP_BY_HOP]
        return _Response(answer.status, answer.reason, headers, answer.read())
    finally:
        connection.close()


def _start_emulator(bucket: str, log: IO[bytes]) -> tuple[subprocess.Popen, int]:
    """gcp-storage-emulator in memory on a free port with `bucket`, once it answers its health check. Picking the
    port and the emulator binding it are two steps, so a port taken in between costs one more try."""
    for _ in range(3):
        port = _free_port()
        command = [sys.executable, "-m", "gcp_storage_emulator", "start", f"--host={HOST}", f"--port={port}"]
        command += ["--in-memory", f"--default-bucket={bucket}", "--quiet"]
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if _call(port, _Request("GET", "/", [], b"")).status == HTTPStatus.OK:
                    return process, port
            time.sleep(0.05)
        process.kill()
        process.wait()
    log.seek(0)
    raise RuntimeError(f"gcp-storage-emulator did not start: {log.read().decode(errors='replace')[-2000:]}")


class _Handler(http.server.BaseHTTPRequestHandler):
    """Reads a request whole (Content-Length or chunked), hands it to the `GcsServer`, writes its answer; HTTP/1.1
    so that clients keep their connections open, as they do with Cloud Storage."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: Nagle would hold the body 40 ms
    server: _ProxyServer

    def _read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailer fields, up to the blank line
            pass
        return b"".join(chunks)

    def _proxy(self) -> None:
        request = _Request(self.command, self.path, list(self.headers.items()), self._read_body())
        response = self.server.gcs.handle(request)
        if response is None:  # an injected dropped connection: no answer, and the socket closes
            self.close_connection = True
            return
        self.send_response_only(response.status, response.reason)
        for key, value in response.headers:
            if key.lower() != "content-length":
                self.send_header(key, value)
        if response.status != HTTPStatus.NOT_MODIFIED:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _proxy

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a client's idle keep-alive connection must not hold up the end of a test session
    request_queue_size = 128  # the default backlog, 5, drops the SYNs of a burst (tensorstore opens up to 32)

    def __init__(self, gcs: GcsServer) -> None:
        self.gcs = gcs
        super().__init__((HOST, 0), _Handler)

    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        """A client gone mid-answer (a run killed on purpose) is no error of the proxy's; anything else is shown."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class GcsServer:
    """The emulator and its proxy (see the module docstring), running from construction to `close`, with one bucket,
    `bucket`, which `url` names."""

    def __init__(self, bucket: str = "test-bucket") -> None:
        self.bucket = bucket
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (the emulator writes to it until `close`)
        self._emulator, self._emulator_port = _start_emulator(bucket, self._log)
        self._state = threading.Lock()
        self._faults: Faults | None = None
        self._random = random.Random()
        self._counts: collections.Counter[str] = collections.Counter()
        self._faulted: set[str] = set()
        self._object_locks: dict[tuple[str, str], threading.Lock] = {}
        self._uploads: dict[str, tuple[str, str]] = {}
        self._emulator_slots = threading.BoundedSemaphore(4)
        self._proxy = _ProxyServer(self)
        self.endpoint = f"http://{HOST}:{self._proxy.server_address[1]}"
        threading.Thread(target=self._proxy.serve_forever, args=(0.05,), name="gcs-proxy", daemon=True).start()

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this server: gcsfs reads STORAGE_EMULATOR_HOST, tensorstore the other two
        (any token will do; without one tensorstore looks for Google credentials)."""
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "abc",
        }

    def url(self, path: str = "") -> str:
        """`gs://BUCKET/path` in the current bucket."""
        return f"gs://{self.bucket}/{path.lstrip('/')}"

    def set_faults(self, faults: Faults | None) -> None:
        """Injects `faults` from the next request on (None: no more); the seeded sequence starts over."""
        with self._state:
            self._faults = faults if faults and faults.rate > 0 else None
            self._random = random.Random(faults.seed if faults else 0)

    def counts(self) -> dict[str, int]:
        """requests: all the proxy received; faults, and one entry per kind: injected; retries: requests repeating
        the method, path and query of one that had a fault; precondition_failed: refused with 412 or 304."""
        with self._state:
            return {key: self._counts[key] for key in COUNTED}

    def reset_counts(self) -> None:
        with self._state:
            self._counts.clear()
            self._faulted.clear()

    def close(self) -> None:
        """Stops the proxy, then the emulator (killed if SIGTERM has not ended it in 10 s)."""
        self._proxy.shutdown()
        self._proxy.server_close()
        self._emulator.terminate()
        try:
            self._emulator.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._emulator.kill()
            self._emulator.wait()
        self._log.close()

    def handle(self, request: _Request) -> _Response | None:
        """The answer to `request` (None: drop the connection), after the fault drawn for it, if any."""
        fault, slow_s = self._draw_fault(request)
        if fault == "drop":
            return None
        if fault == "503":
            return _error(503, "backendError", "Injected fault: the service is unavailable; retry.")
        if fault == "403":
            return _error(403, "forbidden", "Injected fault: access to this object is refused.")
        if fault == "slow":
            time.sleep(slow_s)
        if _MOVE.match(urlsplit(request.target).path):
            return _error(400, "invalid", "gcs_server: the emulator has no moveTo; copy and delete instead.")
        try:
            return self._serve(request)
        except (OSError, http.client.HTTPException) as error:
            return _error(502, "backendError", f"gcs_server: the emulator did not answer: {error}")

    def _draw_fault(self, request: _Request) -> tuple[str | None, float]:
        """Counts `request` (a retry when it repeats one that had a fault) and draws its fault, if any, with the
        delay of a slow one."""
        split = urlsplit(request.target)
        query = urlencode([(k, v) for k, v in parse_qsl(split.query, keep_blank_values=True) if k != _CACHE_BUSTER])
        key = f"{request.method} {split.path}?{query}"
        with self._state:
            self._counts["requests"] += 1
            if key in self._faulted:
                self._counts["retries"] += 1
                self._faulted.discard(key)
            faults = self._faults
            if faults is None or (faults.names and not re.search(faults.names, unquote(request.target))):
                return None, 0.0
            if self._random.random() >= faults.rate:
                return None, 0.0
            fault = self._random.choice(faults.kinds)
            self._counts["faults"] += 1
            self._counts[fault] += 1
            self._faulted.add(key)
            return fault, faults.slow_s

    def _serve(self, request: _Request) -> _Response:
        """Forwards `request`; an object request under the object's lock, after its preconditions are checked."""
        split = urlsplit(request.target)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        target = self._target(split.path, query, request)
        if target is None:
            return _filter_listing(request, split.path, query, self._ask(request))
        conditions = {name: query[name] for name in CONDITIONS if name in query}
        if not all(value.isdigit() for value in conditions.values()):
            return _error(400, "invalid", f"Invalid precondition value in {conditions}.")
        download = request.method == "GET" and (split.path.startswith("/download/") or query.get("alt") == "media")
        with self._object_lock(target):
            metadata = self._metadata(*target) if conditions or download else None
            failed = [name for name, value in conditions.items() if not _holds(name, int(value), metadata)]
            if failed:
                with self._state:
                    self._counts["precondition_failed"] += 1
                if request.method == "GET" and failed[0].endswith("NotMatch"):
                    return _Response(HTTPStatus.NOT_MODIFIED, "Not Modified", [], b"")
                message = f"At least one of the pre-conditions you specified did not hold: {failed[0]}."
                return _error(412, "conditionNotMet", message)
            response = self._ask(request)
            if download and metadata and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
                response.headers.append(("x-goog-generation", metadata["generation"]))
                response.headers.append(("x-goog-metageneration", metadata["metageneration"]))
            self._remember_upload(query, target, response)
            return response

    def _object_lock(self, target: tuple[str, str]) -> threading.Lock:
        with self._state:
            return self._object_locks.setdefault(target, threading.Lock())

    def _target(self, path: str, query: dict[str, str], request: _Request) -> tuple[str, str] | None:
        """(bucket, object name) of an object request; None for anything else (listings, buckets, batches)."""
        if match := _OBJECT.match(path):
            return unquote(match["bucket"]), unquote(match["name"])
        if not (match := _UPLOAD.match(path)):
            return None
        with self._state:
            session = self._uploads.get(query.get("upload_id", ""))
        if session:
            return session
        name = query.get("name") or _name_in_body(request)
        return (unquote(match["bucket"]), name) if name else None

    def _remember_upload(self, query: dict[str, str], target: tuple[str, str], response: _Response) -> None:
        """A resumable upload's later requests name only its session (and its preconditions: the session URL is
        the start's URL with the session id added), so the object is remembered from the start."""
        if query.get("uploadType") != "resumable" or "upload_id" in query:
            return
        for key, value in response.headers:
            if key.lower() == "location" and (upload_id := dict(parse_qsl(urlsplit(value).query)).get("upload_id")):
                with self._state:
                    self._uploads[upload_id] = target

    def _ask(self, request: _Request) -> _Response:
        """The emulator's answer to `request`. It serves one connection at a time with a listen backlog of 5:
        more connections at once than that (tensorstore writes 32 objects at a time) have their SYNs dropped and
        wait a second for the retransmission, so the proxy queues them itself."""
        with self._emulator_slots:
            return _call(self._emulator_port, request)

    def _metadata(self, bucket: str, name: str) -> dict | None:
        """The object's metadata, asked of the emulator itself; None when it does not exist."""
        path = f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"
        found = self._ask(_Request("GET", path, [], b""))
        if found.status == HTTPStatus.NOT_FOUND:
            return None
        if found.status != HTTPStatus.OK:
            raise http.client.HTTPException(f"metadata of gs://{bucket}/{name}: HTTP {found.status}")
        return json.loads(found.body)


def _holds(condition: str, value: int, metadata: dict | None) -> bool:
    """Whether a Cloud Storage precondition holds for an object with `metadata` (None: absent). Generation 0 stands
    for "no live object": ifGenerationMatch=0 means "only if absent"."""
    if condition.startswith("ifGeneration"):
        matches = metadata is None if value == 0 else metadata is not None and int(metadata["generation"]) == value
    else:
        matches = metadata is not None and int(metadata["metageneration"]) == value
    return not matches if condition.endswith("NotMatch") else matches


def _name_in_body(request: _Request) -> str | None:
    """The object name of an upload that gives it only in its metadata: the JSON body of a resumable upload's
    start, or the first part of a multipart upload (gcsfs's small files)."""
    content_type = next((value for key, value in request.headers if key.lower() == "content-type"), "")
    try:
        if content_type.startswith("application/json"):
            return json.loads(request.body).get("name")
        if content_type.startswith("multipart/related"):
            head = f"Content-Type: {content_type}\r\n\r\n".encode()
            parts = email.parser.BytesParser().parsebytes(head + request.body).get_payload()
            return json.loads(parts[0].get_payload()).get("name")
    except (ValueError, IndexError, TypeError, AttributeError):
        return None
    return None


def _filter_listing(request: _Request, path: str, query: dict[str, str], response: _Response) -> _Response:
    """Applies a listing's `startOffset` (inclusive) and `endOffset` (exclusive), which the emulator ignores and
    tensorstore's list and delete_range send for their key range."""
    start, end = query.get("startOffset"), query.get("endOffset")
    listed = request.method == "GET" and _LISTING.match(path) and response.status == HTTPStatus.OK
    if not listed or (start is None and end is None):
        return response

    def inside(name: str) -> bool:
        return (start is None or name >= start) and (end is None or name < end)

    listing = json.loads(response.body)
    listing["items"] = [item for item in listing.get("items", []) if inside(item["name"])]
    listing["prefixes"] = [prefix for prefix in listing.get("prefixes", []) if inside(prefix)]
    response.body = json.dumps(listing).encode()
    return response


def installed() -> bool:
    """Whether gcp-storage-emulator can be started from this interpreter."""
    return importlib.util.find_spec("gcp_storage_emulator") is not None


@contextlib.contextmanager
def serve(bucket: str = "test-bucket", faults: Faults | None = None) -> Iterator[GcsServer]:
    """The emulator (in memory, with `bucket`) and its proxy, for the length of the block."""
    server = GcsServer(bucket)
    try:
        server.set_faults(faults)
        yield server
    finally:
        server.close()


def main(argv: list[str] | None = None) -> None:
    """Serves until SIGTERM or Ctrl-C: prints `export K=V` lines first, and its counts (on stderr) last."""
    parser = argparse.ArgumentParser(prog="python -m tests.gcs_server", description="A local Cloud Storage.")
    parser.add_argument("--bucket", default="test-bucket")
    parser.add_argument("--fault_rate", type=float, default=0.0, help="share of requests given a fault (0 = none)")
    parser.add_argument("--fault_kinds", default=",".join(RANDOM_KINDS), help=f"comma-separated, of {FAULT_KINDS}")
    parser.add_argument("--slow_s", type=float, default=2.0, help="the delay of a 'slow' fault")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    faults = Faults(args.fault_rate, tuple(args.fault_kinds.split(",")), args.slow_s, args.seed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SystemExit unwinds `serve`, which stops the emulator
    with serve(args.bucket, faults) as server:
        for key, value in server.env.items():
            print(f"export {key}={value}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            print(json.dumps(server.counts()), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
