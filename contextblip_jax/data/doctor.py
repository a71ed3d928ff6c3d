"""The dataset doctor: checks a downloaded ImageCoDe folder once, fully, and lists every damaged set.

Users run it after the 14 GB download (`python -m contextblip_jax.data.doctor --root=PATH`) so that a training
run does not stop hours in on a truncated image. Unlike the reader, which stops at the first problem or skips it,
the doctor keeps going and reports all of them: per split the numbers of sets, descriptions, video and static
descriptions; every image must exist and decode as a JPEG, every set must have 10 images, every target be 0-9.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from contextblip_jax.data import imagecode
from contextblip_jax.data.errors import DataError, ErrorPolicy
from contextblip_jax.data.preprocess import read_and_decode_jpeg


@dataclasses.dataclass(frozen=True)
class Problem:
    split: str | None
    set_name: str | None
    path: str
    problem: str


class _Collector(ErrorPolicy):
    """An error policy that neither raises nor logs: the doctor wants every problem, then reports them all."""

    def __init__(self):
        super().__init__("skip", "doctor")
        self.errors: list[DataError] = []

    def handle(self, error: DataError, examples: int = 1) -> None:
        self.errors.append(error)


@dataclasses.dataclass
class Report:
    root: str
    counts: dict[str, dict[str, int]]
    problems: list[Problem]

    def damaged_sets(self) -> dict[str, list[Problem]]:
        """Problems grouped by set name, in the order found; file-level problems are under the empty name."""
        grouped: dict[str, list[Problem]] = collections.defaultdict(list)
        for p in self.problems:
            grouped[p.set_name or ""].append(p)
        return dict(grouped)

    def summary(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "splits": self.counts,
            "damaged_sets": len([name for name in self.damaged_sets() if name]),
            "problems": [dataclasses.asdict(p) for p in self.problems],
        }

    def failure_message(self) -> str:
        lines = []
        for name, problems in self.damaged_sets().items():
            splits = sorted({p.split for p in problems if p.split})
            label = f"set {name}" if name else "file"
            details = "; ".join(f"{os.path.relpath(p.path, self.root)}: {p.problem}" for p in problems)
            lines.append(f"  {label} ({', '.join(splits) or '-'}): {details}")
        damaged = len([name for name in self.damaged_sets() if name])
        return f"{self.root}: {damaged} damaged set(s), {len(self.problems)} problem(s):\n" + "\n".join(lines)


def _count(data: Any) -> dict[str, int]:
    """Counts as the file states them, damaged entries included, to compare with the published numbers."""
    counts = {"sets": 0, "descriptions": 0, "video_descriptions": 0, "static_descriptions": 0}
    if not isinstance(data, dict):
        return counts
    for set_name, entries in data.items():
        counts["sets"] += 1
        n = len(entries) if isinstance(entries, dict | list) else 0
        counts["descriptions"] += n
        static = isinstance(set_name, str) and imagecode.is_static(set_name)
        counts["static_descriptions" if static else "video_descriptions"] += n
    return counts


def _check_image(path: str, split: str, set_name: str) -> Problem | None:
    try:
        read_and_decode_jpeg(path, set_name)
    except DataError as error:
        return Problem(split, set_name, error.path, error.problem)
    return None


def diagnose(root: str, splits: Sequence[str] = tuple(imagecode.SPLIT_FILES), workers: int = 1) -> Report:
    """Every problem of the folder: split files, annotations, set folders, and each image decoded in full."""
    counts: dict[str, dict[str, int]] = {}
    problems: list[Problem] = []
    set_split: dict[str, str] = {}  # each referenced set, with the first split naming it
    for split in splits:
        path = imagecode.split_path(root, split)
        try:
            data = imagecode.read_json(path)
        except DataError as error:
            problems.append(Problem(split, None, error.path, error.problem))
            continue
        counts[split] = _count(data)
        collector = _Collector()
        try:
            imagecode.parse_annotations(data, path, split, collector)
        except DataError as error:
            collector.errors.append(error)
        problems += [Problem(split, e.set_name, e.path, e.problem) for e in collector.errors]
        if isinstance(data, dict):
            for set_name in data:
                if isinstance(set_name, str) and set_name.strip():
                    set_split.setdefault(set_name, split)

    to_decode: list[tuple[str, str, str]] = []
    for set_name, split in set_split.items():
        try:
            paths = imagecode.list_set_images(root, set_name)
        except DataError as error:
            problems.append(Problem(split, set_name, error.path, error.problem))
            continue
        to_decode += [(path, split, set_name) for path in paths]
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:  # PIL releases the GIL while decoding
        problems += [p for p in pool.map(lambda job: _check_image(*job), to_decode) if p is not None]
    return Report(root, counts, problems)


def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    splits = [s for s in _SPLITS.value if s]
    report = diagnose(_ROOT.value, splits=splits, workers=_WORKERS.value)
    print(json.dumps(report.summary(), indent=2))
    if report.problems:
        sys.exit(report.failure_message())


if __name__ == "__main__":
    from absl import app, flags

    _ROOT = flags.DEFINE_string("root", None, "ImageCoDe folder (train_data.json, ..., image-sets/).", required=True)
    _SPLITS = flags.DEFINE_list("splits", list(imagecode.SPLIT_FILES), "Splits whose files must exist and are checked.")
    _WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Threads decoding images.")
    app.run(_main)
