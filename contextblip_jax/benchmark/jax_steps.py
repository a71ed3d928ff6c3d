"""The JAX side of the benchmark: the trainer's own jitted steps (`programs.build`), compiled and called on a random
batch, with XLA's figures for the compiled program.

Imports: its own package (`benchmark`), `compile`, `models`, `parallel`, `runconfig`, `stages`, `training`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from contextblip_jax import parallel, runconfig, stages
from contextblip_jax.compile import hardware
from contextblip_jax.models.config import ContextBLIPConfig
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.models.variants import VARIANTS
from contextblip_jax.runconfig.defaults import base_config
from contextblip_jax.training import programs
from contextblip_jax.training.step import TrainState

PRESETS: dict[str, ContextBLIPConfig] = {
    "tiny": VARIANTS["tiny"],
    "small": VARIANTS["small"],
    "base": VARIANTS["B/16"],
    "large": VARIANTS["L/16"],
}
"""Benchmark names for rows of the variant table (`models/variants.py`)."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What one measurement runs: the preset's model, the stage's train step (train) or scores, the batch shape."""

    preset: str
    stage: str
    train: bool
    dtype: str = "float32"
    descriptions: int = 2
    candidates: int = 10
    text_length: int = 64
    remat: tuple[str, ...] = ()
    attention: str = "einsum"

    @property
    def config(self) -> ContextBLIPConfig:
        """The preset with PyTorch's default kernel initialisation (speed is the same): BERT's N(0, 0.02) at
        random makes every candidate score and loss nearly equal, so comparing two frameworks' outputs would
        prove little; with fan-in kernels, a torch side without its adapter misses by 25x the tolerance."""
        return dataclasses.replace(PRESETS[self.preset], init="fan_in")

    @property
    def stage_row(self) -> stages.Stage:
        return stages.get(self.stage)

    @property
    def length(self) -> int:
        """`text_length`, cut to what the preset's text tower holds (the tiny preset has 24 positions)."""
        return min(self.text_length, self.config.blip.text.max_positions)

    @property
    def images(self) -> int:
        return self.descriptions if self.stage_row.data == "captions" else self.descriptions * self.candidates


CHECKED = re.compile(r"^(adapter|head)\.|^blip\.(vision\.blocks\.0|text\.layers\.0)\.")
"""The parameters the torch agreement check compares after one update (`torch_steps.update_difference`): the
adapter, the head, the first ViT block and the first text layer, all trainable in stage 2a."""


@dataclasses.dataclass
class Prepared:
    """A compiled step ready to be timed. `first`: its first output (the loss before any update, or the scores);
    `updated`: a train step's trainable parameters after that first update (JAX: dotted names; torch: its
    state-dict names), those `CHECKED` picks, for the agreement check."""

    call: Callable[[], Any]
    compile_s: float
    first: np.ndarray
    figures: dict[str, Any]
    updated: dict[str, np.ndarray] | None = None


def interleaved_times(fns: list[Callable[[], Any]], runs: int, warmup: int) -> list[list[float]]:
    """Wall times of each function, timed in turns (A, B, A, B, ...) so that drift in the machine's load affects
    all of them alike. A function's result is waited for (JAX arrays, torch tensors through `.cpu()`)."""

    def wait(result: Any) -> None:
        jax.block_until_ready(result)
        if hasattr(result, "cpu"):
            result.cpu()

    for fn in fns:
        for _ in range(warmup):
            wait(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            wait(fn())
            bucket.append(time.perf_counter() - start)
    return times


def random_batch(setup: Setup) -> dict[str, np.ndarray]:
    """A batch of the stage's fields and shapes (as the input pipeline delivers them), random values."""
    rng = np.random.default_rng(0)
    config, n = setup.config, setup.descriptions
    size = config.blip.vision.image_size
    per_description = () if setup.stage_row.data == "captions" else (setup.candidates,)
    ids = rng.integers(1000, config.blip.text.vocab_size, (n, setup.length))
    fields = {
        "images": rng.standard_normal((n, *per_description, size, size, 3)).astype(np.float32),
        "input_ids": ids.astype(np.int32),
        "attention_mask": np.ones((n, setup.length), np.int32),
        "target": rng.integers(0, setup.candidates, n).astype(np.int32),
        "is_video": np.zeros(n, bool),
    }
    return {name: fields[name] for name in setup.stage_row.batch_fields}


def step_figures(fn: Callable[..., Any], args: tuple[Any, ...], compiled: Any) -> dict[str, Any]:
    """FLOPs per step of `fn(*args)` (`hardware.program_flops`: the program's count, lowered for the CPU whatever
    the device) and the compiler's memory estimate for `compiled` (None where the backend gives none)."""
    return {"flops_per_step": hardware.program_flops(fn, *args), "estimated_memory_bytes": memory_estimate(compiled)}


def memory_estimate(compiled: Any) -> int | None:
    """The compiler's bytes for `compiled`'s arguments, outputs and temporaries, donated ones counted once (None
    where the backend gives no analysis)."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )


def run_config(setup: Setup) -> ml_collections.ConfigDict:
    """The trainer's base config with the setup's remat, attention and dtype (checked together: cudnn attention
    takes only bf16/fp16); the mesh puts every device on `data`."""
    config = base_config()
    config.remat = list(setup.remat)
    config.attention = setup.attention
    config.dtype = setup.dtype
    return runconfig.prepare(config, data=False, weights=False)


def prepare(setup: Setup, batch: dict[str, np.ndarray], keep_params: bool = False) -> tuple[Prepared, dict]:
    """The stage's step as the trainer builds it (`programs.build`: its jit, shardings and donation) on a mesh
    over all of this host's devices (data parallel; several only in the devices sweep), compiled and called
    once; and, with `keep_params`, the model's initial parameters as numpy arrays (dotted names) for another
    framework to start from."""
    stage = setup.stage_row
    began = time.perf_counter()
    model = ContextBLIP(setup.config, dtype=jnp.dtype(setup.dtype), rngs=nnx.Rngs(0))
    logging.info("jax: %s model built in %.1f s", setup.preset, time.perf_counter() - began)
    config = run_config(setup)
    mesh = parallel.make_mesh(config.mesh)
    parallel.check_batch(setup.descriptions, mesh)
    built = programs.build(config, stage, model, mesh, steps_per_epoch=1000)
    trainable, frozen = built.trainable, built.frozen
    params = {name: np.array(value) for name, value in {**trainable, **frozen}.items()} if keep_params else {}
    device_batch = jax.device_put(dict(batch), built.batch_sharding)
    if setup.train:
        state = TrainState(jnp.zeros((), jnp.int32), trainable, frozen, built.tx.init(trainable))
        state = jax.device_put(state, built.state_sharding)
        fn = built.train_step.__wrapped__  # the unjitted step, counted on the CPU as aot.py counts it
        figures_args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (state, device_batch))
        start = time.perf_counter()
        compiled = built.train_step.trace(state, device_batch).lower().compile()
        compile_s = time.perf_counter() - start
        holder = [state]

        def call() -> Any:
            holder[0], metrics = compiled(holder[0], device_batch)
            return metrics["loss"]

    else:
        placement = built.state_sharding
        trainable, frozen = jax.device_put((trainable, frozen), (placement.trainable, placement.frozen))
        fn, figures_args = built.predict.__wrapped__, (trainable, frozen, device_batch)
        start = time.perf_counter()
        compiled = built.predict.trace(*figures_args).lower().compile()
        compile_s = time.perf_counter() - start

        def call() -> Any:
            return compiled(trainable, frozen, device_batch)

    logging.info("jax: step compiled in %.1f s on %d device(s)", compile_s, mesh.size)
    start = time.perf_counter()
    first = np.asarray(call())
    logging.info("jax: first call %.1f s", time.perf_counter() - start)
    updated = None
    if setup.train and keep_params:  # another framework's update is compared with this one
        updated = {name: np.asarray(value) for name, value in holder[0].trainable.items() if CHECKED.search(name)}
    start = time.perf_counter()
    figures = step_figures(fn, figures_args, compiled)
    logging.info("jax: cost and memory analysis %.1f s: %s", time.perf_counter() - start, figures)
    return Prepared(call, compile_s, first, figures, updated), params


def adapter_times(setup: Setup, runs: int, warmup: int) -> list[list[float]]:
    """Zero-shot scoring with and without the adapter (plain BLIP) on the same weights and inputs, timed in turns."""
    config = setup.config
    model = ContextBLIP(config, dtype=jnp.dtype(setup.dtype), rngs=nnx.Rngs(0))
    batch = random_batch(dataclasses.replace(setup, stage="zeroshot"))
    images, ids, mask = (jnp.asarray(batch[k]) for k in ("images", "input_ids", "attention_mask"))
    count = setup.candidates

    @nnx.jit
    def with_adapter(model: ContextBLIP) -> jax.Array:
        return model.zero_shot_scores(images, ids, mask)

    @nnx.jit
    def without_adapter(model: ContextBLIP) -> jax.Array:
        flat = images.reshape(-1, *images.shape[2:])
        logits = model.blip.itm_logits_from_features(
            model.blip.image_features(flat), jnp.repeat(ids, count, 0), jnp.repeat(mask, count, 0)
        )
        return jax.nn.softmax(logits, axis=-1)[:, 1].reshape(-1, count)

    return interleaved_times([lambda: with_adapter(model), lambda: without_adapter(model)], runs, warmup)
