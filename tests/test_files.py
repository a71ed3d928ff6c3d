"""The file layer behaves the same on local disk and on Cloud Storage (a local emulator, tests/gcs_server.py), and
names the operation and the object when Cloud Storage keeps failing."""

from __future__ import annotations

import pytest

from contextblip_jax import files
from tests.gcs_server import Faults


@pytest.fixture(params=["local", "gs"])
def folder(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("gcs").url("run")


def test_written_files_read_back_and_appends_extend_them(folder):
    path = files.join(folder, "metrics.jsonl")
    assert not files.exists(path)
    files.append_text(path, "one\n")
    files.append_text(path, "two\n")
    assert files.read_text(path) == "one\ntwo\n"
    files.write_text(path, "replaced\n")
    assert files.read_text(path) == "replaced\n" and files.read_bytes(path) == b"replaced\n"
    files.remove(path)
    files.remove(path)  # a missing file is no error
    assert not files.exists(path)


def test_a_folder_exists_while_it_holds_something_and_moves_whole(folder):
    inner = files.join(folder, "checkpoints", "2")
    files.makedirs(files.join(inner, "sub"))
    files.write_text(files.join(inner, "a.json"), "{}")
    files.write_text(files.join(inner, "sub", "b.json"), "[]")
    assert files.is_dir(inner) and files.is_dir(files.join(folder, "checkpoints"))
    target = files.join(folder, "checkpoints", "damaged-2")
    files.rename(inner, target)
    assert not files.exists(files.join(inner, "a.json"))
    assert files.read_text(files.join(target, "a.json")) == "{}"
    assert files.read_text(files.join(target, "sub", "b.json")) == "[]"


def test_paths_resolve_to_what_orbax_needs():
    assert files.resolve("gs://bucket/run/") == "gs://bucket/run"
    assert files.resolve("relative").startswith("/")
    assert files.join("gs://bucket/run/", "checkpoints", "3") == "gs://bucket/run/checkpoints/3"
    with pytest.raises(ValueError, match="s3://b/run: only local paths and gs:// URLs"):
        files.resolve("s3://b/run")


@pytest.mark.long  # gcsfs spends about 30 s retrying a failing request
def test_lasting_failures_of_cloud_storage_name_the_operation_and_the_object(gcs):
    path = gcs.url("run/best.json")
    files.write_text(path, "{}")
    gcs.set_faults(Faults(rate=1.0, kinds=("503",), names="best.json"))
    with pytest.raises(files.StorageError, match=rf"reading {path} failed: HttpError: .*503"):
        files.read_text(path)
    gcs.set_faults(Faults(rate=1.0, kinds=("403",), names="best.json"))  # not retried: refused at once
    with pytest.raises(files.StorageError, match=rf"writing {path} failed"):
        files.write_text(path, "[]")
    gcs.set_faults(None)
    assert files.read_text(path) == "{}"  # the failed write replaced nothing


@pytest.mark.long  # each retry waits a second or so
def test_passing_failures_are_retried_by_the_client(gcs):
    path = gcs.url("run/metrics.jsonl")
    gcs.set_faults(Faults(rate=0.3, kinds=("503", "drop"), seed=1))
    for i in range(10):
        files.append_text(path, f"{i}\n")
    gcs.set_faults(None)
    assert files.read_text(path) == "".join(f"{i}\n" for i in range(10))
    counts = gcs.counts()
    assert counts["faults"] > 0 and counts["retries"] > 0
