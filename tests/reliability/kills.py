"""The kill-anywhere harness: a CPU training run killed with SIGKILL at random moments, resumed by the same command
after each kill, must end exactly where an uninterrupted run ends.

Kills come in three kinds, taken in turn, their moments drawn at random (seeded):
- `write`: up to 0.2 s after the first or second checkpoint write of the process begins (Orbax writes in the
  background, so the kill lands while arrays are written, a step is renamed into place or older ones deleted);
- `step`: up to 1 s after the process completed its first checkpoint (in a step, an evaluation, a metrics
  write, or the next checkpoint);
- `start`: at a random fraction of the time an earlier process took to begin its first checkpoint write (imports,
  restore, compilation, the first steps), and at the latest when this process begins one.

Optionally the run is first preempted (`terms`): SIGTERM at a `step` moment must end it with exit status 0 and a
complete checkpoint at the step it reports (`preempted_at`), the newest one.

At the end the parameters and optimizer state of the last checkpoint, and every train and valid row of
metrics.jsonl (all fields but the measured throughput), must equal those of an uninterrupted run of the same config
(in this process: the same code as the command), and the file must hold each (split, step) once and no torn line.

    python -m tests.reliability.kills --kills=10 --steps=60 --seed=0   # the long run (CI: a short one, test_kills.py)
    python -m tests.reliability.kills --kills=10 --steps=60 --seed=0 --gcs   # the same on gs:// (a local emulator)

With `--gcs` (or `run(..., workdir="gs://...")`) the interrupted run's workdir is on Cloud Storage, where Orbax
marks a complete step with a `commit_success.txt` object instead of renaming a temporary folder; the uninterrupted
run it is compared with stays on local disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import chex
import orbax.checkpoint as ocp
from etils import epath

from contextblip_jax import files, train
from contextblip_jax.checkpoints.lock import holder
from tests.runs import ROOT, run_config, train_command

SETTINGS = {
    "log_every": 1,
    "checkpoint_every": 2,
    "keep_checkpoints": 2,  # deletions of old checkpoints happen too, and may be killed
    "eval_every": 4,
    "eval.splits": ("valid",),
}
TIMED = ("examples_per_s",)
"""Fields of a train row that measure the machine rather than the run."""
KINDS = ("write", "step", "start")
TIMEOUT_S = 600
LOCK_TAKEN_OVER = "took over the lock from"
"""What a run logs when it takes over the workdir lock a killed run left (checkpoints/lock.py)."""


@dataclasses.dataclass
class Kill:
    kind: str  # one of KINDS, or "term" for a SIGTERM
    at_s: float  # seconds after the process started
    resumed_from: int | None  # the step the killed process had resumed from (None: not restored when killed)
    inside_write: bool  # a checkpoint's temporary folder existed at the kill
    warmed_up_s: float | None  # when its first checkpoint write began or completed (`write`, `step` kills)
    preempted_at: int | None = None  # the step a SIGTERM'd run reported
    left_lock: bool = False  # the workdir's lock was still there once the process was gone


def metrics_lines(workdir: str) -> list[str]:
    path = files.join(workdir, "metrics.jsonl")
    if not files.exists(path):
        return []
    return files.read_text(path).split("\n")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def checkpoint_folders(workdir: str) -> tuple[set[str], set[tuple[str, int]]]:
    """(complete steps, temporary folders as (name, creation time)) under W/checkpoints. The time tells a folder
    a process has just begun from one of the same name a killed process left behind (on Cloud Storage, where
    folders have no time, 0: a step written again under a killed one's name does not count as new)."""
    if files.is_url(workdir):
        return _committed_objects(files.join(workdir, "checkpoints"))
    folder = os.path.join(workdir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    temporaries = set()
    for name in names:
        if "tmp" in name:
            with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
                temporaries.add((name, os.stat(os.path.join(folder, name)).st_ctime_ns))
    return {n for n in names if n.isdigit()}, temporaries


def _committed_objects(folder: str) -> tuple[set[str], set[tuple[str, int]]]:
    """`checkpoint_folders` on Cloud Storage: a step folder is complete once its commit marker exists."""
    root = epath.Path(folder)
    names = [p.name for p in root.iterdir()] if root.exists() else []
    complete = {n for n in names if n.isdigit() and (root / n / "commit_success.txt").exists()}
    return complete, {(n, 0) for n in names if n not in complete and (n.isdigit() or "tmp" in n)}


def resumed_from(stderr: str) -> int | None:
    marker = "resumed from step "
    if marker not in stderr:
        return None
    return int(stderr.split(marker)[1].split()[0])


def flags(settings: dict) -> list[str]:
    """Command-line overrides: a string as written (the flag parser keeps quotes), anything else as a literal."""
    return [f"--config.{key}={value if isinstance(value, str) else repr(value)}" for key, value in settings.items()]


def start(
    workdir: str, data_root: str, steps: int, log_path: str, settings: dict = SETTINGS
) -> tuple[subprocess.Popen, object]:
    log = open(log_path, "w")  # noqa: SIM115 - closed by the caller once the process is gone
    command = train_command(workdir, data_root, *flags(settings), f"--config.total_steps={steps}")
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True), log


class Watch:
    """Tells when a kill's moment has come: `write` waits for the `nth` checkpoint write this process starts (a
    temporary folder appears), `step` for its first newly completed checkpoint, `start` for nothing; then the
    kill waits `delay` more seconds (a `start` kill no longer than until a checkpoint write begins)."""

    def __init__(self, workdir: str, kind: str, rng: random.Random, warm_up_s: float):
        self.workdir, self.kind = workdir, kind
        start_delay = rng.uniform(0.05, 1.0) * warm_up_s  # anywhere before training resumes
        step_delay = rng.uniform(0.0, 1.0)
        delays = {"write": rng.uniform(0.0, 0.2), "step": step_delay, "term": step_delay, "start": start_delay}
        self.delay = delays[kind]
        self.nth = rng.choice((1, 2))  # the second write begins only after the first one completed
        self.complete_before, self.temporaries_before = checkpoint_folders(workdir)
        self.temporaries_seen: set[tuple[str, int]] = set()  # those this process began
        self.began = time.monotonic()
        self.came_at = self.began if kind == "start" else None

    def due(self) -> bool:
        now = time.monotonic()
        complete, temporaries = checkpoint_folders(self.workdir)
        self.temporaries_seen |= temporaries - self.temporaries_before
        if self.came_at is None:
            completed = bool(complete - self.complete_before)
            came = {"write": len(self.temporaries_seen) >= self.nth, "step": completed, "term": completed}
            if came[self.kind]:
                self.came_at = now
        if self.kind == "start" and self.temporaries_seen:  # at the latest when training has resumed
            return True
        return self.came_at is not None and now - self.came_at >= self.delay


def kill_once(
    workdir: str,
    data_root: str,
    steps: int,
    kind: str,
    rng: random.Random,
    warm_up_s: float,
    log_path: str,
    settings: dict = SETTINGS,
) -> Kill | None:
    """Starts the run, kills (or with `kind="term"` preempts) it as `kind` says; None when it finished before the
    moment came. `warm_up_s` is how long a process took to reach its first checkpoint before (`start` kills fall
    before that)."""
    watch = Watch(workdir, kind, rng, warm_up_s)
    process, log = start(workdir, data_root, steps, log_path, settings)
    inside_write = False
    sent = signal.SIGTERM if kind == "term" else signal.SIGKILL
    try:
        while process.poll() is None and time.monotonic() - watch.began < TIMEOUT_S:
            if watch.due():
                inside_write = bool(checkpoint_folders(workdir)[1] - watch.temporaries_before)
                process.send_signal(sent)
                process.wait(timeout=TIMEOUT_S)
                break
            time.sleep(0.002)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    with open(log_path) as f:
        output = f.read()
    preempted = preempted_at(output)
    if process.returncode == 0 and preempted is None:
        return None
    if process.returncode != (0 if kind == "term" else -signal.SIGKILL):
        raise AssertionError(f"the run failed on its own (rc {process.returncode}):\n{output[-3000:]}")
    if kind == "term":  # the step it stopped at is saved whole, and is the newest
        complete, temporaries = checkpoint_folders(workdir)
        assert max(map(int, complete)) == preempted and not temporaries, (preempted, complete, temporaries)
    warmed_up = None if watch.came_at is None or kind == "start" else round(watch.came_at - watch.began, 2)
    elapsed = round(time.monotonic() - watch.began, 2)
    left_lock = holder(workdir) is not None
    return Kill(kind, elapsed, resumed_from(output), inside_write, warmed_up, preempted, left_lock)


def preempted_at(output: str) -> int | None:
    """The step a preempted run reports on its last stdout line (`{"preempted_at": N}`)."""
    for line in reversed(output.splitlines()):
        if line.startswith('{"preempted_at"'):
            return json.loads(line)["preempted_at"]
    return None


def finish(workdir: str, data_root: str, steps: int, log_path: str, settings: dict = SETTINGS) -> str:
    process, log = start(workdir, data_root, steps, log_path, settings)
    try:
        process.wait(timeout=TIMEOUT_S)
    finally:
        log.close()
    with open(log_path) as f:
        output = f.read()
    if process.returncode != 0:
        raise AssertionError(f"the run failed (rc {process.returncode}):\n{output[-3000:]}")
    return output


def final_state(workdir: str, step: int) -> dict:
    """The train state (parameters, optimizer state, step) stored at `step`, as host arrays."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(files.join(files.resolve(workdir), "checkpoints", str(step), "state"))


def comparable_rows(workdir: str) -> list[str]:
    """metrics.jsonl's rows without the timing fields, as sorted JSON texts (exact, and NaN equals NaN), after
    checking that every line is whole and each (split, step) appears once."""
    lines = metrics_lines(workdir)
    assert lines[-1] == "", "metrics.jsonl ends inside a line"
    rows = [json.loads(line) for line in lines[:-1]]  # a torn line raises here
    keys = [(r["split"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), f"duplicated rows: {sorted(k for k in keys if keys.count(k) > 1)}"
    return sorted(json.dumps({k: v for k, v in r.items() if k not in TIMED}, sort_keys=True) for r in rows)


def run(
    kills: int,
    seed: int,
    data_root: str,
    base: str,
    steps: int,
    terms: int = 0,
    extra: dict | None = None,
    workdir: str | None = None,
) -> dict:
    """Preempts a `steps`-step run `terms` times, then kills it `kills` times, resumes it to the end, and compares it
    with an uninterrupted one; returns the report (raises AssertionError on any difference). `extra`: run-config
    keys (dotted) on top of `SETTINGS`; `workdir`: the interrupted run's (default: in `base`, as the logs and the
    uninterrupted run are), e.g. a `gs://` URL."""
    settings = {**SETTINGS, **(extra or {})}
    rng = random.Random(seed)
    began = time.monotonic()
    interrupted, straight = workdir or os.path.join(base, "interrupted"), os.path.join(base, "straight")
    kinds = ["term"] * terms + [KINDS[i % len(KINDS)] for i in range(kills)]  # in turn: each kind as often
    done: list[Kill] = []
    warm_up_s = 12.0  # until a write or step kill has measured it
    for attempt, kind in enumerate(kinds, 1):
        kill = kill_once(
            interrupted, data_root, steps, kind, rng, warm_up_s, os.path.join(base, f"attempt-{attempt}.log"), settings
        )
        if kill is None:
            raise AssertionError(f"the run finished before interruption {attempt}: give it more steps than {steps}")
        warm_up_s = kill.warmed_up_s or warm_up_s
        done.append(kill)
    output = finish(interrupted, data_root, steps, os.path.join(base, "final.log"), settings)
    overrides = {key.replace(".", "__"): value for key, value in settings.items()}
    train.train(run_config(data_root, total_steps=steps, **overrides), straight)

    chex.assert_trees_all_equal(final_state(interrupted, steps), final_state(straight, steps))
    got, expected = comparable_rows(interrupted), comparable_rows(straight)
    assert got == expected, "metrics rows differ from the uninterrupted run's"
    sigkills = [k for k in done if k.kind != "term"]
    after_kills = [f"attempt-{n}.log" for n in range(2, len(kinds) + 1)] + ["final.log"]
    logs = [os.path.join(base, name) for name in after_kills]
    return {
        "locks_left": sum(k.left_lock for k in done),
        "locks_left_by_sigterm": sum(k.left_lock for k in done if k.kind == "term"),
        "lock_takeovers": sum(LOCK_TAKEN_OVER in _read(log) for log in logs),
        "kills": len(sigkills),
        "kills_by_kind": {kind: sum(k.kind == kind for k in done) for kind in KINDS},
        "preempted_at": [k.preempted_at for k in done if k.kind == "term"],
        "inside_checkpoint_writes": sum(k.inside_write for k in sigkills),
        "resumes_from": [k.resumed_from for k in done] + [resumed_from(output)],
        "kill_times_s": [k.at_s for k in done],
        "rows_compared": len(got),
        "wall_s": round(time.monotonic() - began, 1),
        "seed": seed,
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--terms", type=int, default=0, help="SIGTERM preemptions before the kills")
    parser.add_argument("--steps", type=int, default=60, help="the run's total steps (more kills need more)")
    parser.add_argument("--data_root", default=None, help="generated data (default: generated in a temporary folder)")
    parser.add_argument("--gcs", action="store_true", help="the interrupted run on gs:// (a local Cloud Storage)")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU harness: no accelerator plugin starts in the runs
    base = tempfile.mkdtemp(prefix="kills-")
    data_root = args.data_root
    if data_root is None:
        from contextblip_jax.training import inputs
        from tests.runs import run_config

        data_root = os.path.join(base, "data")
        inputs.ensure_synthetic_data(run_config(data_root))
    with contextlib.ExitStack() as stack:
        workdir = None
        if args.gcs:
            from tests import gcs_server

            server = stack.enter_context(gcs_server.serve(bucket="kills"))
            os.environ.update(server.env)
            workdir = server.url("interrupted")
        json.dump(run(args.kills, args.seed, data_root, base, args.steps, args.terms, workdir=workdir), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
