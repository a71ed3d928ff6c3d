"""A run's files on local disk or on Cloud Storage (`gs://BUCKET/PATH`), behind one small set of functions.

Cloud TPU runs keep their workdir in a bucket. Orbax and tensorstore speak `gs://` themselves; everything else a
run writes (metrics.jsonl, best.json, model_config.json, curves.png, the feature cache) goes through here. URLs are
served by etils.epath, the layer Orbax itself reaches Cloud Storage through (fsspec and gcsfs underneath), so a
run depends on one Cloud Storage client stack rather than two. Local paths keep the plain `os` calls: their
rename is atomic, which the `gs://` side gets instead from single-object uploads (an object appears whole or not
at all).

Imports: nothing of the package.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import fsspec
from etils import epath

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
"""gcsfs's default filesystem first asks a storage-layout API what kind each bucket is (zonal, hierarchical) and,
where it cannot (no default credentials, an emulator, a token without that permission), warns twice per call
before falling back to the plain filesystem, which serves a run's files in every bucket. Read when gcsfs is
first imported; a value set in the environment wins."""
fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)
"""gcsfs keeps each folder listing it made, for good unless told otherwise; a workdir's folders change under it
(tensorstore writing this process's arrays, the other hosts, the run before), and a stale listing of
`checkpoints/` would hide a step. So every listing asks Cloud Storage."""


class StorageError(OSError):
    """A read or write of Cloud Storage that failed once gcsfs's own retries were spent (unavailable, timing out,
    refused): the message names the operation and the object, so a stopped run says what to rerun against."""


@contextlib.contextmanager
def _named(operation: str, path: str) -> Iterator[None]:
    """Any failure of `operation` on the URL `path`, but for a missing object (callers handle that), as one
    `StorageError` naming both."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as error:  # gcsfs, aiohttp and fsspec raise many types
        message = str(error).splitlines()[0][:300] if str(error) else ""
        raise StorageError(f"{operation} {path} failed: {type(error).__name__}: {message}") from error


def is_url(path: str) -> bool:
    """Whether `path` names remote storage (`gs://...`) rather than a local path."""
    return "://" in path


def check_supported(path: str) -> None:
    """A URL other than `gs://` is refused up front, naming it: the tests only ever ran against Cloud Storage."""
    if is_url(path) and not path.startswith("gs://"):
        raise ValueError(f"{path}: only local paths and gs:// URLs are supported")


def resolve(path: str) -> str:
    """An absolute local path (Orbax needs one), or the URL without a trailing slash."""
    check_supported(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(base: str, *names: str) -> str:
    return "/".join([base.rstrip("/"), *names]) if is_url(base) else os.path.join(base, *names)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    with _named("looking up", path):
        return epath.Path(path).exists()


def is_dir(path: str) -> bool:
    """On Cloud Storage a folder is a name prefix: it exists while some object lies under it."""
    if not is_url(path):
        return os.path.isdir(path)
    with _named("listing", path):
        return epath.Path(path).is_dir()


def list_names(path: str) -> list[str]:
    """The names in the folder `path` ([] when there is none). Unlike `exists`, which fsspec answers False for any
    failure, a storage failure here raises (`StorageError`, or the local `OSError`)."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    with _named("listing", path):
        return sorted(p.name for p in epath.Path(path).iterdir())


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def read_bytes(path: str) -> bytes:
    if is_url(path):
        with _named("reading", path):
            return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def remove(path: str) -> None:
    """Deletes the file at `path`, if there is one."""
    if is_url(path):
        with _named("deleting", path):
            epath.Path(path).unlink(missing_ok=True)
    elif os.path.exists(path):
        os.remove(path)


def write_text(path: str, text: str) -> None:
    """Replaces `path` with `text` whole: readers (and a run killed meanwhile) see the old or the new content."""
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    """As `write_text`: locally a temporary file renamed into place; on Cloud Storage one object upload."""
    if is_url(path):
        with _named("writing", path):
            epath.Path(path).write_bytes(data)
        return
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def append_text(path: str, text: str) -> None:
    """Adds `text` at the end of `path` (created if missing). Cloud Storage objects cannot grow, so there the
    whole object is uploaded again: each append costs the file's size, fine for a run's metrics (kilobytes to a
    few megabytes), not for bulk data."""
    if is_url(path):
        try:
            before = read_text(path)
        except FileNotFoundError:
            before = ""
        write_text(path, before + text)
        return
    with open(path, "a") as f:
        f.write(text)


def makedirs(path: str) -> None:
    """Local folders are created; Cloud Storage has none to create (an object's name carries its folders)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def rename(path: str, target: str) -> None:
    """Moves a file or folder. Locally one atomic rename; on Cloud Storage each object is copied, then deleted,
    so a kill meanwhile can leave part at either name (used only to set a damaged checkpoint aside)."""
    if is_url(path):
        with _named(f"moving to {target}:", path):
            epath.Path(path).rename(target)
    else:
        os.rename(path, target)
