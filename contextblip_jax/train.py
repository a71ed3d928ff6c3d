"""`python -m contextblip_jax.train --config=configs/X.py[:args] --workdir=W [--config.key=value ...]`.

Reads top to bottom: mesh -> input -> lock -> model -> shardings -> step -> checkpoint -> evals -> loop. Running
the same command again resumes from the newest checkpoint in W; SIGTERM (preemption) saves and exits 0. W is a
local folder or `gs://BUCKET/PATH`; one run at a time holds it (`W/lock.json`): a second one exits with status 2
naming the first.
W/metrics.jsonl rows always carry `step` and `split` (other programs read them); validation rows carry `acc`,
`acc_video`, `acc_static`.

Imports: `cli`, `checkpoints`, `compile`, `data`, `evaluation`, `files`, `parallel`, `runconfig`, `stages`,
`training`; a command (it defines flags), so no module imports it.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from contextblip_jax import cli, files, parallel, runconfig, stages
from contextblip_jax.checkpoints import best, run_state, weights
from contextblip_jax.checkpoints.lock import WorkdirLock, WorkdirLocked, WorkdirLockLost
from contextblip_jax.compile import aot, targets
from contextblip_jax.data.pipeline import make_global_batch
from contextblip_jax.evaluation import features
from contextblip_jax.evaluation.evaluators import build_evaluators
from contextblip_jax.training import exclusive, hostmem, inputs, optim, programs, skipped
from contextblip_jax.training.preemption import Preempted
from contextblip_jax.training.step import TrainState
from contextblip_jax.training.telemetry import METRICS_FILE, Telemetry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config, e.g. configs/synthetic.py:stage=finetune.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder (or gs://BUCKET/PATH) for checkpoints, metrics.jsonl, TensorBoard and plots."
)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process runs only).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs only).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs only).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    100,
    "Multi-process runs: seconds without a heartbeat after which a process counts as lost and jax's distributed "
    "runtime aborts all the others (SIGABRT), instead of leaving them waiting in a collective; rerun them all to "
    "resume from the last checkpoint every process committed. The default is jax's: a false alarm stops a healthy "
    "job and costs a whole restart, whereas a host really lost costs only this long idle.",
    lower_bound=1,
)
_COMPILE_ONLY = flags.DEFINE_string(
    "compile_only",
    None,
    "Compile the run's train and predict steps for TARGET (cpu, v5e-8, v5litepod-8, v4-8, v5p-16, v6e-8, h100x8, "
    "2x8xh100, ...; see contextblip_jax/compile/targets.py) without that hardware or data, write W/compile.json "
    "and exit (non-zero when the config does not fit).",
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "With --compile_only on a TPU target: the number of slices.")
_LOCK_STALE_AFTER = flags.DEFINE_float(
    "lock_stale_after_s",
    120.0,
    "Seconds without a heartbeat after which another run's lock on the workdir counts as abandoned and this run "
    "takes it over. A lock whose process is gone from this host, or that an earlier run of this requeued SLURM job "
    "left, is taken over at once; a live run's heartbeat comes every eighth of this.",
    lower_bound=1.0,
)


def train(
    config,
    workdir: str,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_s: int | None = None,
    lock_stale_after_s: float = 120.0,
) -> dict:
    """Runs (or resumes) the training run in `workdir` (a local folder or `gs://BUCKET/PATH`) and returns its
    summary: the best evaluation row (as `W/best.json` names it), the plot and the metrics file, or `preempted_at`.
    `WorkdirLocked` when another live run holds `workdir`."""
    files.check_supported(workdir)
    config = runconfig.prepare(config)
    stage = stages.get(config.stage)
    if not stage.trains:
        raise ValueError(f"the {stage.name} stage does not train: use python -m contextblip_jax.evaluate")
    # Installed before `jax.distributed` starts: its preemption service then takes SIGTERM over from this handler
    # on multi-process runs (installed later, this handler would hide the signal from it and no process would stop).
    preempted = Preempted()
    try:
        return _train(
            config,
            stage,
            workdir,
            preempted,
            coordinator,
            num_processes,
            process_id,
            heartbeat_timeout_s,
            lock_stale_after_s,
        )
    finally:
        preempted.restore()


def _train(
    config,
    stage: stages.Stage,
    workdir: str,
    preempted: Preempted,
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    heartbeat_timeout_s: int | None,
    lock_stale_after_s: float,
) -> dict:
    # ---- Mesh --------------------------------------------------------------------------------------------
    parallel.initialize_distributed(coordinator, num_processes, process_id, heartbeat_timeout_s)
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch(config.data.batch_size // config.grad_accum_steps, mesh)

    # ---- Input: built (and checked) first; it reads the data folder, never the workdir -------------------------
    train_input = inputs.train_input(config, stage, parallel.batch_shards(mesh))

    # ---- Lock: taken before anything in the workdir is read or written ------------------------------------------
    with exclusive.hold_workdir(workdir, lock_stale_after_s) as lock:
        return _train_holding(config, stage, workdir, preempted, mesh, train_input, lock)


def _train_holding(
    config,
    stage: stages.Stage,
    workdir: str,
    preempted: Preempted,
    mesh: jax.sharding.Mesh,
    train_input: inputs.TrainInput,
    lock: WorkdirLock | None,
) -> dict:
    # ---- Model, shardings and steps, in their shards: a previous checkpoint of this run wins over `config.init` --
    epoch_steps = max(train_input.examples_per_epoch // config.data.batch_size, 1)
    steps_per_epoch = config.optimizer.steps_per_epoch or epoch_steps
    total_steps = config.total_steps or config.epochs * steps_per_epoch
    logging.info("%d steps of %d examples (%d steps per epoch)", total_steps, config.data.batch_size, steps_per_epoch)
    built, state = initial_state(config, stage, mesh, workdir, steps_per_epoch)
    if features.wanted(config, stage):  # the same descriptions, as vectors of the frozen towers computed once
        train_input = features.train_input(config, built, state, mesh, workdir)
    iterator = iter(train_input.dataset)

    # ---- Evals: built once (each reads its split now), run at every evaluation ---------------------------------
    evaluators = build_evaluators(config, stage, mesh)

    with contextlib.ExitStack() as open_files:  # every way out (end, preemption, error) closes them, in reverse
        # ---- Checkpoint: resume if this workdir has one ------------------------------------------------------
        checkpoints = open_files.enter_context(
            contextlib.closing(run_state.RunCheckpoints(workdir, config.keep_checkpoints))
        )
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, built.state_sharding
        )
        resumed = checkpoints.restore_latest(abstract, iterator)  # the newest intact one; damaged ones are named
        start, counters = 0, {}
        if resumed is not None:
            start, state, counters = resumed
            logging.info("resumed from step %d", start)
        skips = skipped.SkipCount(counters.get(skipped.METRIC, 0))
        telemetry = open_files.enter_context(contextlib.closing(Telemetry(workdir, total_steps)))
        telemetry.truncate_after(start)
        keeper = None
        if evaluators:
            keeper = open_files.enter_context(
                contextlib.closing(best.BestKeeper(workdir, best.Criterion.from_config(config)))
            )

        def evaluate(step: int, state: TrainState) -> None:
            for evaluator in evaluators:
                row = evaluator.run(lambda batch: built.predict(state.trainable, state.frozen, batch), step)
                telemetry.write(row)
                kept = keeper.offer(row, lambda: {**state.trainable, **state.frozen})
                logging.info(
                    "step %d %s: acc %.3f (video %.3f, static %.3f; %d descriptions)%s",
                    step,
                    evaluator.split,
                    row["acc"],
                    row["acc_video"],
                    row["acc_static"],
                    row["descriptions"],
                    f", the best so far: kept ({best.BEST_FILE})" if kept else "",
                )

        # ---- Loop --------------------------------------------------------------------------------------------
        last_good, step = start, start
        tick, tick_step = time.perf_counter(), start
        for step in range(start + 1, total_steps + 1):
            batch = make_global_batch(skips.take(next(iterator)), built.batch_sharding)
            state, metrics = built.train_step(state, batch)
            stop = preempted.agreed(step)
            log = step % config.log_every == 0 or step == total_steps
            save = step % config.checkpoint_every == 0 or step == total_steps or stop
            if log or save:  # the last good checkpoint is the newest one: nothing non-finite is ever saved
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if config.nan_check and not math.isfinite(metrics["loss"]):
                    raise NonFiniteLoss(
                        f"loss is {metrics['loss']} at step {step}; stopped. The last good checkpoint is step "
                        f"{last_good}."
                    )
            if log:
                now = time.perf_counter()
                rate = config.data.batch_size * (step - tick_step) / (now - tick)
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
            if config.eval_every and step % config.eval_every == 0 and step != total_steps and not stop:
                evaluate(step, state)
            if save:
                if lock is not None:  # a run that took this workdir over meanwhile: stop before writing into it
                    lock.check()
                checkpoints.save(step, state, iterator, {skipped.METRIC: skips.total()})
                last_good = step
            if stop:
                logging.info("preempted at step %d: checkpoint saved", step)
                return {"preempted_at": step}
        evaluate(total_steps, state)
    best_row = keeper.row if keeper is not None else None
    return {
        "best": {} if best_row is None else {best_row["split"]: best_row},
        "plot": telemetry.plot(),
        "metrics": files.join(workdir, METRICS_FILE),
    }


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
    """The loss became NaN or Inf: the run stops without saving, so its newest checkpoint is the last good one."""


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
            _LOCK_STALE_AFTER.value,
        )
    except (NonFiniteLoss, files.StorageError) as error:  # not the user's to fix: exit status 1, in one line
        sys.exit(f"error: {error}")
    except (WorkdirLocked, WorkdirLockLost) as error:
        cli.fail(error)
    if jax.process_index() == 0:
        print(_summary(result, _WORKDIR.value))
        print(json.dumps(result, default=str))


def _summary(result: dict, workdir: str) -> str:
    """The run's outcome in a line a person reads first; the JSON line after it is for programs."""
    if "preempted_at" in result:
        return f"preempted at step {result['preempted_at']}: checkpoint saved; run the same command to resume"
    rows = [f"best {split} acc {row['acc']:.3f} at step {row['step']}" for split, row in result["best"].items()]
    names = ("metrics.jsonl", "curves.png", best.BEST_FILE, "checkpoints/", f"{features.CACHE_DIR}/")
    written = ", ".join(name for name in names if files.exists(files.join(workdir, name))) or "nothing written"
    return f"done: {'; '.join(rows) or 'no evaluation'}. In {workdir}: {written}"


def _compile_only(config, workdir: str, target_name: str, num_slices: int) -> None:
    """`--compile_only`: the report as a table, the JSON path; a config that does not fit exits non-zero."""
    aot.use_cpu_host()
    try:
        report = aot.compile_only(config, workdir, targets.parse(target_name, num_slices))
    except aot.DoesNotFit as error:
        print(aot.table(error.report))
        sys.exit(f"error: {error}")
    print(aot.table(report))
    print(f"written: {workdir}/{aot.REPORT_FILE}")


def run() -> None:
    """`contextblip-train`: the same as `python -m contextblip_jax.train`."""
    cli.run(main, required=["config", "workdir"])


if __name__ == "__main__":
    run()
