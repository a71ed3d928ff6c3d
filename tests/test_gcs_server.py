"""tests/gcs_server.py, the local Cloud Storage: it refuses what Cloud Storage refuses (preconditions, atomically,
the check where tensorstore and gcsfs send it), serves tensorstore, gcsfs and etils.epath, and injects faults at
its rate, in the order its seed gives, which tensorstore's retries get through with the data intact."""

import http.client
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote, urlsplit

import pytest
import tensorstore as ts
from etils import epath

from tests.gcs_server import Faults, GcsServer
from tests.runs import ROOT

FAST_RETRIES = {"gcs_request_retries": {"max_retries": 16, "initial_delay": "1ms", "max_delay": "10ms"}}
"""tensorstore's defaults (32 retries, 1 s doubling to 32 s) would make a test with faults take minutes."""


def _kvstore(gcs: GcsServer, path: str = "run/") -> ts.KvStore:
    spec = {"driver": "gcs", "bucket": gcs.bucket, "path": path}
    return ts.KvStore.open(spec, context=ts.Context(FAST_RETRIES)).result()


def _connection(gcs: GcsServer) -> http.client.HTTPConnection:
    endpoint = urlsplit(gcs.endpoint)
    return http.client.HTTPConnection(endpoint.hostname, endpoint.port, timeout=10)


def _request(
    connection: http.client.HTTPConnection, method: str, target: str, body: bytes | None = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    connection.request(method, target, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), response.read()


def _object(gcs: GcsServer, name: str, download: bool = False) -> str:
    """The JSON API path of object `name` in the test's bucket (its metadata, or its bytes)."""
    return f"/storage/v1/b/{gcs.bucket}/o/{quote(name, safe='')}" + ("?alt=media" if download else "")


def _media_upload(gcs: GcsServer, name: str, query: str = "") -> str:
    return f"/upload/storage/v1/b/{gcs.bucket}/o?uploadType=media&name={quote(name, safe='')}{query}"


def test_conditional_create_succeeds_once(gcs: GcsServer) -> None:
    kv = _kvstore(gcs)
    missing = kv.read("lock").result().stamp.generation
    first = kv.write("lock", b"A", if_equal=missing).result()
    second = kv.write("lock", b"B", if_equal=missing).result()
    assert first.generation and not second.generation  # tensorstore reports a refused condition as generation b""
    assert kv.read("lock").result().value == b"A"
    assert gcs.counts()["precondition_failed"] == 1


def test_stale_generation_is_refused_for_update_and_read(gcs: GcsServer) -> None:
    kv = _kvstore(gcs)
    first = kv.write("state", b"1").result()
    second = kv.write("state", b"2").result()
    read = kv.read("state").result()
    assert (read.value, read.stamp.generation) == (b"2", second.generation)  # the proxy adds x-goog-generation
    assert not kv.write("state", b"3", if_equal=first.generation).result().generation
    assert kv.read("state", if_not_equal=second.generation).result().state == "unspecified"  # 304: unchanged
    assert kv.write("state", b"3", if_equal=second.generation).result().generation
    assert kv.read("state").result().value == b"3"


def test_stale_generation_delete_leaves_the_object(gcs: GcsServer) -> None:
    kv = _kvstore(gcs)
    first = kv.write("ckpt", b"1").result()
    second = kv.write("ckpt", b"2").result()
    assert not kv.write("ckpt", None, if_equal=first.generation).result().generation
    assert kv.read("ckpt").result().value == b"2"
    assert kv.write("ckpt", None, if_equal=second.generation).result().generation
    assert kv.read("ckpt").result().state == "missing"


def test_concurrent_conditional_creates_have_one_winner(gcs: GcsServer) -> None:
    kv = _kvstore(gcs)
    missing = kv.read("lock").result().stamp.generation
    start = threading.Barrier(8)

    def create(writer: int) -> bytes:
        start.wait()
        return kv.write("lock", str(writer).encode(), if_equal=missing).result().generation

    with ThreadPoolExecutor(8) as pool:
        generations = list(pool.map(create, range(8)))
    winners = [writer for writer, generation in enumerate(generations) if generation]
    assert len(winners) == 1
    assert kv.read("lock").result().value == str(winners[0]).encode()
    assert gcs.counts()["precondition_failed"] == 7


def test_gcsfs_create_mode_is_refused_when_the_object_exists(gcs: GcsServer) -> None:
    """gcsfs's `mode="create"` sends ifGenerationMatch=0: in a multipart upload naming the object only in its
    metadata (small files), and at the start of a resumable upload (large ones)."""
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    for name, size in (("small", 10), ("large", 6 * 2**20)):
        fs.pipe_file(f"{gcs.bucket}/{name}", b"a" * size, mode="create")
        with pytest.raises(FileExistsError):
            fs.pipe_file(f"{gcs.bucket}/{name}", b"b" * size, mode="create")
        assert fs.cat_file(f"{gcs.bucket}/{name}") == b"a" * size


def test_resumable_upload_is_checked_when_it_completes(gcs: GcsServer) -> None:
    """A resumable upload whose object appeared after it started is refused at its last request: the session's
    requests name only the session, the object is known from the start (which named it only in its body)."""
    connection = _connection(gcs)
    start = f"/upload/storage/v1/b/{gcs.bucket}/o?uploadType=resumable&ifGenerationMatch=0"
    status, headers, _ = _request(connection, "POST", start, json.dumps({"name": "late"}).encode(), **{
        "Content-Type": "application/json"
    })  # fmt: skip
    assert status == 200
    session = urlsplit(headers["Location"])
    assert _request(connection, "POST", _media_upload(gcs, "late"), b"other")[0] == 200
    status, _, body = _request(connection, "PUT", f"{session.path}?{session.query}", b"mine", **{
        "Content-Range": "bytes 0-3/4"
    })  # fmt: skip
    assert (status, json.loads(body)["error"]["errors"][0]["reason"]) == (412, "conditionNotMet")
    assert _request(connection, "GET", _object(gcs, "late", download=True))[2] == b"other"


def test_metageneration_conditions_and_chunked_uploads(gcs: GcsServer) -> None:
    connection = _connection(gcs)
    connection.request("POST", _media_upload(gcs, "meta"), body=iter([b"chun", b"ked"]), encode_chunked=True)
    response = connection.getresponse()
    assert (response.status, json.loads(response.read())["size"]) == (200, "7")
    assert _request(connection, "GET", _object(gcs, "meta") + "?ifMetagenerationMatch=2")[0] == 412
    assert _request(connection, "GET", _object(gcs, "meta") + "?ifMetagenerationMatch=1")[0] == 200
    assert _request(connection, "GET", _object(gcs, "meta", download=True))[2] == b"chunked"


def test_tensorstore_lists_only_its_key_range(gcs: GcsServer) -> None:
    """The emulator ignores a listing's startOffset/endOffset, tensorstore's key range: without the proxy's
    filter, `delete_range` on one prefix would delete the whole bucket."""
    _kvstore(gcs, "other/").write("b", b"x").result()
    kv = _kvstore(gcs)
    kv.write("a", b"y").result()
    assert kv.list().result() == [b"a"]
    kv.delete_range(ts.KvStore.KeyRange()).result()
    assert _kvstore(gcs, "").list().result() == [b"other/b"]


def test_epath_writes_reads_and_lists(gcs: GcsServer) -> None:
    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs.endpoint == os.environ["TENSORSTORE_GCS_HTTP_URL"]
    root = epath.Path(gcs.url("run"))
    (root / "a.txt").write_text("hi")
    large = bytes(range(256)) * 40_000  # 10 MB: a resumable upload in two requests
    (root / "sub" / "b.bin").write_bytes(large)
    assert sorted(path.name for path in root.iterdir()) == ["a.txt", "sub"]
    assert (root / "a.txt").read_text() == "hi"
    assert (root / "sub" / "b.bin").read_bytes() == large
    (root / "a.txt").unlink()
    assert not (root / "a.txt").exists()
    assert [path.name for path in root.glob("*/*")] == ["b.bin"]


@pytest.mark.parametrize("kind", ["503", "drop", "slow"])
def test_each_fault_kind(gcs: GcsServer, kind: str) -> None:
    """A 503 and a dropped connection forward nothing (the upload never happened); a slow answer is late, not
    different."""
    gcs.set_faults(Faults(rate=1.0, kinds=(kind,), slow_s=0.3))
    connection = _connection(gcs)
    started = time.monotonic()
    if kind == "drop":
        with pytest.raises(http.client.RemoteDisconnected):
            _request(connection, "POST", _media_upload(gcs, "x"), b"data")
    else:
        status, _, body = _request(connection, "POST", _media_upload(gcs, "x"), b"data")
        assert status == {"503": 503, "slow": 200}[kind]
        assert kind == "slow" or json.loads(body)["error"]["code"] == 503
    assert kind != "slow" or time.monotonic() - started >= 0.3
    assert gcs.counts() | {"requests": 1, "faults": 1, kind: 1} == gcs.counts()
    gcs.set_faults(None)
    assert _request(_connection(gcs), "GET", _object(gcs, "x"))[0] == (200 if kind == "slow" else 404)


def test_fault_rate_seed_and_retry_counts(gcs: GcsServer) -> None:
    """100 requests at rate 0.3, each repeated until it gets through, as a client would."""
    connection = _connection(gcs)

    def first_answers(seed: int) -> list[int]:
        gcs.reset_counts()
        gcs.set_faults(Faults(rate=0.3, kinds=("503",), seed=seed))
        answers = []
        for i in range(100):
            answers.append(status := _request(connection, "GET", _object(gcs, f"absent-{i}"))[0])
            while status == 503:
                status = _request(connection, "GET", _object(gcs, f"absent-{i}"))[0]
            assert status == 404
        return answers

    answers = first_answers(seed=0)
    counts = gcs.counts()
    assert 15 <= answers.count(503) <= 45  # 30 expected, standard deviation 4.6
    assert counts["faults"] == counts["503"] == counts["retries"] == counts["requests"] - 100
    assert first_answers(seed=0) == answers
    assert first_answers(seed=1) != answers


def test_tensorstore_retries_faults_and_data_arrives_intact(gcs: GcsServer) -> None:
    kv = _kvstore(gcs)
    gcs.set_faults(Faults(rate=0.3, kinds=("503", "drop"), seed=0))
    values = {f"k{i:02d}": os.urandom(20_000) for i in range(30)}
    for written in [kv.write(key, value) for key, value in values.items()]:
        written.result()
    assert {key: kv.read(key).result().value for key in values} == values
    assert kv.list().result() == [key.encode() for key in values]
    counts = gcs.counts()
    assert counts["503"] > 0 and counts["drop"] > 0
    assert counts["retries"] == counts["faults"]  # every faulted request came again, its cache-buster aside


def test_script_prints_the_environment_and_stops_its_emulator() -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.gcs_server", "--bucket=script-bucket"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        env = dict(server.stdout.readline().removeprefix("export ").strip().split("=", 1) for _ in range(3))
        children = pathlib.Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        endpoint = urlsplit(env["TENSORSTORE_GCS_HTTP_URL"])
        connection = http.client.HTTPConnection(endpoint.hostname, endpoint.port, timeout=10)
        assert _request(connection, "GET", "/storage/v1/b/script-bucket")[0] == 200
        assert env["STORAGE_EMULATOR_HOST"] == env["TENSORSTORE_GCS_HTTP_URL"]
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=10)
    assert server.returncode == 0
    assert json.loads(stderr.strip().splitlines()[-1])["requests"] == 1
    assert children and not any(os.path.exists(f"/proc/{child}") for child in children)
