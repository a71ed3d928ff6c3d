"""What a run reports: `W/metrics.jsonl` (the contract), TensorBoard events (tensorboardX, no TensorFlow),
a progress line on terminals, and a PNG of the training loss and validation accuracy at the end.

Only process 0 writes; every process may call. The workdir may be a `gs://` URL (`files`): there TensorBoard's
events are written to a local folder and uploaded (each file whole, through `files` and its retries) every
`EVENTS_UPLOAD_EVERY_S` and at the end, rather than by tensorboardX's own Cloud Storage writer, which uploads at
every flush through a second client library that does not retry a first upload.

Imports: its own package (`training`), `files`.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
from absl import logging

from contextblip_jax import files

METRICS_FILE = "metrics.jsonl"
PROGRESS_LINES = 10
"""Progress lines a whole run logs where stderr is not a terminal (a log file, a batch job's output)."""
PLOT_FILE = "curves.png"
EVENTS_DIR = "tensorboard"
EVENTS_UPLOAD_EVERY_S = 30.0
"""How often a `gs://` run's TensorBoard events reach the bucket: each upload sends the events file whole."""


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors; this module writes Python
    floats. Where torch is installed (the conversion and test environment) that import costs seconds at every
    run's start, so it is refused for the duration of tensorboardX's import (a `None` entry in `sys.modules` makes
    `import torch` raise ImportError, which tensorboardX handles). An already imported torch is left alone.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class Telemetry:
    def __init__(self, workdir: str, total_steps: int):
        self.workdir = workdir
        self.total_steps = total_steps
        self.primary = jax.process_index() == 0
        self._start = time.perf_counter()
        self._start_step: int | None = None
        self._logged = 0  # the step of the last progress line logged
        self._events = None
        self._events_dir = files.join(workdir, EVENTS_DIR)
        """Where tensorboardX writes: the workdir's folder, or for a `gs://` run a local one uploaded from."""
        self._uploaded = time.monotonic()
        if self.primary:
            files.makedirs(workdir)
            if files.is_url(workdir):
                self._events_dir = tempfile.mkdtemp(prefix="contextblip-tensorboard-")
            self._events = _summary_writer_class()(self._events_dir)

    def truncate_after(self, step: int) -> None:
        """Drops rows logged after `step`: a resumed run rewrites them, so the file reads as one clean run.

        The shortened file replaces the old one whole (`files.write_text`), so a kill at any moment leaves one or
        the other."""
        if not self.primary:
            return
        rows = [r for r in read_metrics(self.workdir) if r["step"] <= step]
        files.write_text(files.join(self.workdir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict[str, Any]) -> None:
        """Appends one metrics row (it must carry `step` and `split`); TensorBoard gets its finite numbers (a split
        without static sets has a NaN static accuracy)."""
        if not self.primary:
            return
        files.append_text(files.join(self.workdir, METRICS_FILE), json.dumps(row) + "\n")
        for key, value in row.items():
            if key not in ("step", "split") and isinstance(value, int | float) and math.isfinite(value):
                self._events.add_scalar(f"{row['split']}/{key}", value, row["step"])
        self._events.flush()
        if time.monotonic() - self._uploaded >= EVENTS_UPLOAD_EVERY_S:
            self._upload_events()

    def _upload_events(self) -> None:
        """A `gs://` run's local events files to `W/tensorboard/`; nothing to do for a local workdir."""
        if not files.is_url(self.workdir):
            return
        for name in files.list_names(self._events_dir):
            events = files.read_bytes(os.path.join(self._events_dir, name))
            files.write_bytes(files.join(self.workdir, EVENTS_DIR, name), events)
        self._uploaded = time.monotonic()

    def progress(self, step: int, loss: float, examples_per_s: float) -> None:
        """A progress line with loss, throughput and ETA: redrawn in place on a terminal; elsewhere logged
        `PROGRESS_LINES` times over the run (every row would bury the evaluations)."""
        if self._start_step is None:
            self._start_step, self._start = step, time.perf_counter()
            self._logged = step
        done = step - self._start_step
        elapsed = time.perf_counter() - self._start
        eta = elapsed / done * (self.total_steps - step) if done else float("nan")
        width = 30
        filled = int(width * step / max(self.total_steps, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total_steps} loss {loss:.4f} "
            f"{examples_per_s:.1f} ex/s ETA {eta:.0f}s"
        )
        if not self.primary:
            return
        if sys.stderr.isatty():
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        elif step >= self._logged + math.ceil(self.total_steps / PROGRESS_LINES) or step == self.total_steps:
            logging.info(line)
            self._logged = step

    def plot(self) -> str | None:
        """Training loss and validation accuracy against step, from metrics.jsonl, as W/curves.png."""
        if not self.primary:
            return None
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        rows = read_metrics(self.workdir)
        train = [(r["step"], r["loss"]) for r in rows if r["split"] == "train" and "loss" in r]
        valid = [(r["step"], r["acc"]) for r in rows if r["split"] == "valid" and "acc" in r]
        figure, loss_axis = plt.subplots(figsize=(7, 4))
        if train:
            loss_axis.plot(*zip(*train, strict=True), color="tab:blue", label="train loss")
        loss_axis.set_xlabel("step")
        loss_axis.set_ylabel("train loss", color="tab:blue")
        if valid:
            acc_axis = loss_axis.twinx()
            acc_axis.plot(*zip(*valid, strict=True), "o-", color="tab:orange", label="valid accuracy")
            acc_axis.set_ylabel("valid accuracy", color="tab:orange")
            acc_axis.set_ylim(0, 1)
        figure.tight_layout()
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=100)
        plt.close(figure)
        path = files.join(self.workdir, PLOT_FILE)
        files.write_bytes(path, image.getvalue())
        return path

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            if files.is_url(self.workdir):
                try:
                    self._upload_events()
                finally:
                    shutil.rmtree(self._events_dir, ignore_errors=True)
        if self.primary and sys.stderr.isatty():
            sys.stderr.write("\n")


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of `W/metrics.jsonl`. A last line without its newline is a row a killed run was writing: it is
    dropped with a warning (the resumed run writes that step again); a damaged line elsewhere is an error."""
    path = files.join(workdir, METRICS_FILE)
    if not files.exists(path):
        return []
    lines = files.read_text(path).split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not a JSON row: {error}") from error
            logging.warning("%s: dropping a torn last line (a run was killed while writing it): %r", path, line[:80])
    return rows
