"""`python -m contextblip_jax.train --config=configs/X.py[:args] --workdir=W [--config.key=value ...]`.

Reads top to bottom: mesh -> input -> model -> shardings -> step -> checkpoint -> evals -> loop. Running the
same command again resumes from the newest checkpoint in W; SIGTERM (preemption) saves and exits 0.
W/metrics.jsonl rows always carry `step` and `split` (other programs read them); validation rows carry `acc`,
`acc_video`, `acc_static`.

Imports: everything a run needs; nothing imports this module but its tests.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from contextblip_jax import (
    aot,
    best,
    checkpoint,
    hostmem,
    optim,
    parallel,
    programs,
    skipped,
    stages,
    targets,
    trainconfig,
    weights,
)
from contextblip_jax.data import inputs
from contextblip_jax.data.pipeline import make_global_batch
from contextblip_jax.evaluators import build_evaluators
from contextblip_jax.step import TrainState
from contextblip_jax.telemetry import Telemetry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config, e.g. configs/synthetic.py:stage=finetune.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics.jsonl, TensorBoard and plots.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs only).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs only).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs only).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    100,
    "Multi-process runs: seconds without a heartbeat after which a process counts as lost and jax's distributed "
    "runtime aborts all the others (SIGABRT), instead of leaving them waiting in a collective; rerun them all to "
    "resume from the last checkpoint every process committed. 100 (jax's default): heartbeats come from a thread "
    "of their own, which compiling or checkpointing does not delay, and a false alarm (a host stalled by swapping "
    "or a busy coordinator) stops a healthy job and costs a whole restart, whereas a host really lost costs only "
    "this long idle.",
    lower_bound=1,
)
_COMPILE_ONLY = flags.DEFINE_string(
    "compile_only",
    None,
    "Compile the run's train and predict steps for TARGET (cpu, v5e-8, v5litepod-8, v4-8, v5p-16, v6e-8, h100x8, "
    "2x8xh100, ...; see contextblip_jax/targets.py) without that hardware or data, write W/compile.json and exit "
    "(non-zero when the config does not fit).",
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "With --compile_only on a TPU target: the number of slices.")


class Preempted:
    """Turns SIGTERM into a flag the loop checks between steps, so the step in flight finishes and is saved.

    With several processes, `jax.distributed` catches SIGTERM itself and its preemption service picks the step at
    which every process stops and saves (one past the furthest any process had reached), even when only some of
    them received the signal. Only the main thread may install signal handlers; elsewhere (a test thread)
    preemption of a single process is not watched."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.requested = True

    def agreed(self, step: int) -> bool:
        """Whether to save and stop after `step` (the same answer on every process; call it at every step)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(
    config,
    workdir: str,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int | None = None,
) -> dict:
    """Runs (or resumes) the training run in `workdir` and returns its summary: best validation rows, the plot
    and the metrics file, or `preempted_at`."""
    preempted = Preempted()
    try:
        return _train(config, workdir, preempted, coordinator, num_processes, process_id, heartbeat_timeout_s)
    finally:
        preempted.restore()


def _train(config, workdir, preempted, coordinator, num_processes, process_id, heartbeat_timeout_s) -> dict:
    if "://" in workdir:
        raise ValueError(
            f"workdir {workdir} is a URL; give a path on storage every host shares (e.g. a bucket mounted with "
            "gcsfuse at /mnt/BUCKET, or NFS)"
        )
    stage = trainconfig.check(config)
    trainconfig.check_imagecode_folder(config, stage)
    if not stage.trains:
        raise ValueError(f"the {stage.name} stage does not train: use python -m contextblip_jax.evaluate")

    # ---- Mesh --------------------------------------------------------------------------------------------
    parallel.initialize_distributed(coordinator, num_processes, process_id, heartbeat_timeout_s)
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch(config.data.batch_size // config.grad_accum_steps, mesh)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())

    # ---- Input -------------------------------------------------------------------------------------------
    train_input = inputs.train_input(config, stage)
    iterator = iter(train_input.dataset)

    # ---- Model, shardings and steps, in their shards: a previous checkpoint of this run wins over `config.init` --
    epoch_steps = max(train_input.examples_per_epoch // config.data.batch_size, 1)
    steps_per_epoch = config.optimizer.steps_per_epoch or epoch_steps
    total_steps = config.total_steps or config.get("epochs", 0) * steps_per_epoch
    logging.info("%d steps of %d examples (%d steps per epoch)", total_steps, config.data.batch_size, steps_per_epoch)
    built, state = initial_state(config, stage, mesh, workdir, steps_per_epoch)
    state_sharding, train_step, batch_sharding = built.state_sharding, built.train_step, built.batch_sharding

    # ---- Checkpoint: resume if this workdir has one ----------------------------------------------------------
    checkpoints = checkpoint.RunCheckpoints(workdir, config.keep_checkpoints)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
    resumed = checkpoints.restore_latest(abstract, iterator)  # the newest intact one; damaged ones are named
    start, counters = 0, {}
    if resumed is not None:
        start, state, counters = resumed
        logging.info("resumed from step %d", start)
    skips = skipped.SkipCount(counters.get(skipped.METRIC, 0))
    telemetry = Telemetry(workdir, total_steps)
    telemetry.truncate_after(start)

    # ---- Evals: built once (each reads its split now), run at every evaluation ---------------------------------
    evaluators = build_evaluators(config, stage, mesh)
    predict = built.predict if evaluators else None
    best_rows: dict[str, dict] = {}
    keeper = best.BestKeeper(workdir, best.Criterion.from_config(config)) if evaluators else None

    def evaluate(step: int, state: TrainState) -> None:
        for evaluator in evaluators:
            row = evaluator.run(lambda batch: predict(state.trainable, state.frozen, batch), step)
            telemetry.write(row)
            logging.info("step %d %s: %s", step, evaluator.split, row)
            if keeper.offer(row, lambda: {**state.trainable, **state.frozen}):
                logging.info("step %d is the best so far (%s): kept in %s", step, best.BEST_FILE, workdir)
            if row["acc"] > best_rows.get(evaluator.split, {}).get("acc", -1):
                best_rows[evaluator.split] = row

    # ---- Loop --------------------------------------------------------------------------------------------
    last_good = start
    examples = config.data.batch_size
    tick, tick_step = time.perf_counter(), start
    for step in range(start + 1, total_steps + 1):
        batch = make_global_batch(skips.take(next(iterator)), batch_sharding)
        state, metrics = train_step(state, batch)
        if step % config.log_every == 0 or step == total_steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if config.nan_check and not math.isfinite(metrics["loss"]):
                _stop_on_nan(checkpoints, metrics["loss"], step, last_good)
            now = time.perf_counter()
            rate = examples * (step - tick_step) / (now - tick)
            tick, tick_step = now, step
            row = {
                "step": step,
                "split": "train",
                **metrics,
                **optim.learning_rates(config.optimizer, steps_per_epoch, step - 1),
                skipped.METRIC: skips.total(),
                "examples_per_s": rate,
            }
            telemetry.write(row)
            telemetry.progress(step, metrics["loss"], rate)
        if config.eval_every and step % config.eval_every == 0 and step != total_steps:
            evaluate(step, state)
        stop = preempted.agreed(step)
        if step % config.checkpoint_every == 0 or step == total_steps or stop:
            loss = float(jax.device_get(metrics["loss"]))
            if config.nan_check and not math.isfinite(loss):
                _stop_on_nan(checkpoints, loss, step, last_good)
            checkpoints.save(step, state, iterator, {skipped.METRIC: skips.total()})
            last_good = step
        if stop:
            checkpoints.close()
            telemetry.close()
            if keeper is not None:
                keeper.close()
            logging.info("preempted at step %d: checkpoint saved", step)
            return {"preempted_at": step}
    checkpoints.close()
    evaluate(total_steps, state)
    if keeper is not None:
        keeper.close()
    telemetry.close()
    plot = telemetry.plot()
    return {"best": best_rows, "plot": plot, "metrics": f"{workdir}/metrics.jsonl"}


def initial_state(
    config, stage: stages.Stage, mesh: jax.sharding.Mesh, workdir: str, steps_per_epoch: int
) -> tuple[programs.Programs, TrainState]:
    """The run's programs (`programs.build`, as `--compile_only` builds them) and its state at step 0.

    Every parameter is created or read straight into its shards (`weights.initial_model`; a PyTorch checkpoint
    is the exception: converted whole on the host first), and the optimizer state is initialised in the shards
    its parameters dictate (`parallel.optimizer_shardings`). The parameters are donated to the state rather than
    copied, so `Programs.trainable` and `frozen` keep only their shapes and shardings afterwards."""
    model, origin = weights.initial_model(config, mesh)
    weights.check_resume(workdir, model.config)
    weights.save_model_config(workdir, model)
    built = programs.build(config, stage, model, mesh, steps_per_epoch)
    del model
    logging.info(
        "model from %s: %d parameters train, %d frozen (pattern %r)",
        origin,
        sum(v.size for v in built.trainable.values()),
        sum(v.size for v in built.frozen.values()),
        config.trainable or stage.trainable,
    )
    init_state = jax.jit(
        lambda t, f: TrainState(jnp.zeros((), jnp.int32), t, f, built.tx.init(t)),
        out_shardings=built.state_sharding,
        donate_argnums=(0, 1),
    )
    return built, init_state(built.trainable, built.frozen)


class NonFiniteLoss(RuntimeError):
    pass


def _stop_on_nan(checkpoints: checkpoint.RunCheckpoints, loss: float, step: int, last_good: int) -> None:
    """Stops without saving: the newest checkpoint on disk stays the last one with a finite loss."""
    checkpoints.close()
    raise NonFiniteLoss(f"loss is {loss} at step {step}; stopped. The last good checkpoint is step {last_good}.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    hostmem.keep_freed_memory()
    if _COMPILE_ONLY.value:
        _compile_only(_CONFIG.value, _WORKDIR.value, _COMPILE_ONLY.value, _NUM_SLICES.value)
        return
    try:
        result = train(
            _CONFIG.value,
            _WORKDIR.value,
            _COORDINATOR.value,
            _NUM_PROCESSES.value,
            _PROCESS_ID.value,
            _HEARTBEAT_TIMEOUT.value,
        )
    except (NonFiniteLoss, ValueError, FileNotFoundError, checkpoint.CheckpointError) as error:
        sys.exit(f"error: {error}")
    if jax.process_index() == 0:
        print(json.dumps(result, default=str))


def _compile_only(config, workdir: str, target_name: str, num_slices: int) -> None:
    """`--compile_only`: the report as a table, the JSON path; a config that does not fit exits non-zero."""
    aot.use_cpu_host()
    try:
        report = aot.compile_only(config, workdir, targets.parse(target_name, num_slices))
    except aot.DoesNotFit as error:
        print(aot.table(error.report))
        sys.exit(f"error: {error}")
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(aot.table(report))
    print(f"written: {workdir}/{aot.REPORT_FILE}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
