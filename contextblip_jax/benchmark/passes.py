"""Whole passes over an ImageCoDe split, timed as a user waits for them: the evaluator's pass (decoding, batching
and scoring every description of the split's first N sets) and one training epoch over those sets, each run
exactly as `evaluate` and `train` run it for the config (grouped by set or not, stage 2b on cached features or
not), beside the authors' way in PyTorch (one description per example, its 10 images decoded and encoded each
time) or, for stage 2b, beside the same epoch without the cache.

    rows = pass_rows(PassSetup(step=Setup("base", "zeroshot", train=False, descriptions=36), root=R,
                               split="valid", limit_sets=12), compare=("torch",), runs=3)

Each framework reads the same first N sets (a temporary ImageCoDe folder holding them as its train and valid
files, its images linked to the real ones). Evaluation passes alternate between the frameworks (A, B, A, B);
training passes run one framework after the other, its model freed before the next is built (two base train
states beside their activations do not fit a 24 GB host). After the first round of evaluation passes, PyTorch's
scores of every description must match JAX's within 1e-4 (float32), looked up by example id, else no row is made;
a training pass's agreement is the step benchmark's (`--measure=train --compare=torch`: the first loss and the
parameters after one update).

Imports: its own package (`benchmark`), `compile`, `data`, `evaluation`, `models`, `parallel`, `runconfig`,
`stages`, `training`.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import tempfile
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
from contextblip_jax.benchmark.jax_steps import Setup, memory_estimate, random_batch
from contextblip_jax.compile import aot, hardware
from contextblip_jax.data import imagecode
from contextblip_jax.data.errors import SKIPPED_FIELD
from contextblip_jax.data.pipeline import make_global_batch
from contextblip_jax.evaluation import features
from contextblip_jax.evaluation.evaluators import ImageCodeEvaluator
from contextblip_jax.models.contextblip import ContextBLIP
from contextblip_jax.runconfig.defaults import model_dict
from contextblip_jax.training import inputs, programs
from contextblip_jax.training.step import TrainState

PASS_FRAMEWORKS = ("torch", "uncached")
"""What `--compare` may add to a pass: the authors' way in PyTorch (stage 2a training, zero-shot scoring), or for
stage 2b the same JAX epoch with `context.cache_features` off."""

AGREEMENT = 1e-4
"""The largest |PyTorch - JAX| score of any description allowed before an evaluation pass is timed (float32)."""


@dataclasses.dataclass(frozen=True)
class PassSetup:
    """A pass: `step` gives the preset, stage, dtype, batch size (`descriptions`) and text length; `root` an
    ImageCoDe folder whose `split` file's first `limit_sets` sets are read; `protocol` a row of
    `runconfig/protocol.py`; `group_by_set` / `cache_features` None keep the protocol's choice; `set_slots` sets
    per grouped batch (0: the config's rule, `grouped.Layout.of`)."""

    step: Setup
    root: str
    split: str = "valid"
    limit_sets: int = 12
    protocol: str = "improved"
    group_by_set: bool | None = None
    cache_features: bool | None = None
    set_slots: int = 0


def subset_root(root: str, split: str, limit_sets: int, into: str) -> tuple[int, int]:
    """Writes into `into` an ImageCoDe folder whose train and valid files both hold the first `limit_sets` sets
    of `root`'s `split` file (in file order; the test file the same without targets, as a complete folder has
    one), its `image-sets/` a link to `root`'s; returns (sets, descriptions)."""
    path = imagecode.split_path(root, split)
    with open(path) as f:
        annotations = json.load(f)
    if not isinstance(annotations, dict) or not annotations:
        raise ValueError(f"{path} holds no ImageCoDe sets")
    kept = dict(list(annotations.items())[:limit_sets])
    unlabeled = {name: list(described.values()) for name, described in kept.items()}
    for split_name, content in (("train", kept), ("valid", kept), ("test", unlabeled)):
        with open(os.path.join(into, imagecode.SPLIT_FILES[split_name]), "w") as f:
            json.dump(content, f)
    os.symlink(os.path.abspath(os.path.join(root, imagecode.IMAGE_DIR)), os.path.join(into, imagecode.IMAGE_DIR))
    return len(kept), sum(len(described) for described in kept.values())


def pass_config(setup: PassSetup, root: str, grouped: bool, cached: bool) -> ml_collections.ConfigDict:
    """The run config `train`/`evaluate` would use for `configs/imagecode.py` with the setup's stage and protocol,
    reading `root`, with the benchmark's model (random, PyTorch-default initialisation), dtype, batch size and
    text length, one training epoch, grouping and caching as given."""
    step = setup.step
    config = runconfig.config_file("imagecode", f"stage={step.stage},protocol={setup.protocol}")
    config.model = model_dict(step.config)
    config.init = ""
    config.dtype = step.dtype
    config.data.update(root=root, synthetic=0, batch_size=step.descriptions, max_text_length=step.length)
    config.data.update(image_size=step.config.blip.vision.image_size, num_epochs=1, group_by_set=grouped)
    config.data.set_slots = setup.set_slots
    config.eval.update(batch_size=step.descriptions, group_by_set=grouped, set_slots=setup.set_slots)
    config.context.cache_features = cached
    return runconfig.prepare(config, data=True, weights=False)


def protocol_choice(setup: PassSetup) -> tuple[bool, bool]:
    """(group_by_set, cache_features) of the setup: its flags, else the protocol's (training reads
    `data.group_by_set`, evaluation `eval.group_by_set`)."""
    config = runconfig.config_file("imagecode", f"stage={setup.step.stage},protocol={setup.protocol}")
    default_group = config.data.group_by_set if setup.step.train else config.eval.group_by_set
    grouped = default_group if setup.group_by_set is None else setup.group_by_set
    cached = config.context.cache_features if setup.cache_features is None else setup.cache_features
    return bool(grouped), bool(cached) and stages.get(setup.step.stage).features and setup.step.train


@dataclasses.dataclass
class Side:
    """One framework's pass, ready to run: `run()` makes one pass and returns (descriptions, outputs by example
    id or None); `figures`: what the row reports beside the times; `release()` frees its model."""

    name: str
    run: Callable[[], tuple[int, dict[int, np.ndarray] | None]]
    figures: dict[str, Any]
    release: Callable[[], None] = lambda: None


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _jax_model(setup: PassSetup, config: ml_collections.ConfigDict) -> tuple[programs.Programs, Any]:
    step = setup.step
    model = ContextBLIP(step.config, dtype=jnp.dtype(step.dtype), rngs=nnx.Rngs(0))
    mesh = parallel.make_mesh(config.mesh)
    return programs.build(config, stages.get(step.stage), model, mesh, steps_per_epoch=1000), mesh


def jax_eval_side(setup: PassSetup, root: str, grouped: bool) -> tuple[Side, dict[str, np.ndarray]]:
    """The evaluator's pass with the stage's jitted predict step, compiled on the first batch; and the model's
    parameters (numpy, dotted names) for PyTorch to start from."""
    config = pass_config(setup, root, grouped, cached=False)
    built, mesh = _jax_model(setup, config)
    params = {name: np.array(value) for name, value in {**built.trainable, **built.frozen}.items()}
    placement = built.state_sharding
    trainable, frozen = jax.device_put((built.trainable, built.frozen), (placement.trainable, placement.frozen))
    data = runconfig.data_config(config, train=False)
    evaluator = ImageCodeEvaluator(data, "valid", mesh, grouped, config.eval.set_slots)
    first = make_global_batch(next(iter(evaluator.batches())), evaluator.sharding)
    began = time.perf_counter()
    compiled = built.predict.trace(trainable, frozen, first).lower().compile()
    compile_s = time.perf_counter() - began
    jax.block_until_ready(compiled(trainable, frozen, first))
    per_batch = hardware.program_flops(built.predict.__wrapped__, *_abstract((trainable, frozen, first)))
    batches = (
        len(evaluator.plan) if evaluator.layout is not None else math.ceil(len(evaluator.source) / data.batch_size)
    )
    descriptions = len(evaluator.source)
    ungrouped = random_batch(setup.step)  # the same step on per-description batches: the authors' way's work
    per_description = hardware.program_flops(built.predict.__wrapped__, *_abstract((trainable, frozen, ungrouped)))
    logging.info("jax: predict compiled in %.1f s; %d batches", compile_s, batches)

    def run() -> tuple[int, dict[int, np.ndarray]]:
        collected = evaluator.collect(lambda batch: compiled(trainable, frozen, batch))
        ids = collected["example_id"].tolist()
        return len(ids), dict(zip(ids, collected["output"], strict=True))

    figures = {
        "compile_s": round(compile_s, 2),
        "estimated_memory_bytes": memory_estimate(compiled),
        "batches": batches,
        "set_slots": evaluator.layout.set_slots if evaluator.layout is not None else None,
        "images_encoded_per_description": round(evaluator.images_encoded / descriptions, 4),
        "flops_per_description": per_batch * batches / descriptions if per_batch else None,
        "flops_per_description_ungrouped": per_description / setup.step.descriptions if per_description else None,
    }
    return Side("jax", run, figures), params


def torch_eval_side(setup: PassSetup, root: str, params: dict[str, np.ndarray]) -> Side:
    """The authors' way of scoring the split: per-description batches, each description's 10 images encoded."""
    from contextblip_jax.benchmark import torch_steps  # torch is a development dependency
    from contextblip_jax.runconfig.defaults import base_config

    config = pass_config(setup, root, grouped=False, cached=False)
    held = torch_steps.build_model(setup.step, params, base_config().optimizer, "cpu")
    data = runconfig.data_config(config, train=False)
    evaluator = ImageCodeEvaluator(data, "valid", parallel.make_mesh(config.mesh), group_by_set=False)
    dtype = torch_steps.torch_dtype(setup.step.dtype)
    fields = ("images", "input_ids", "attention_mask")

    def run() -> tuple[int, dict[int, np.ndarray]]:
        outputs: dict[int, np.ndarray] = {}
        for batch in evaluator.batches():
            tensors = {name: torch_steps.torch.from_numpy(np.asarray(batch[name])) for name in fields}
            scores = torch_steps.make_torch_step(held, tensors, dtype, False)().float().numpy()
            for example_id, row in zip(np.asarray(batch["example_id"]).tolist(), scores, strict=True):
                if example_id >= 0:
                    outputs[example_id] = row
        return len(outputs), outputs

    images = evaluator.images_encoded / len(evaluator.source)
    return Side("torch", run, {"compile_s": 0.0, "images_encoded_per_description": round(images, 4)})


def images_encoded(batch: dict[str, np.ndarray]) -> int:
    """The images a training batch sends through the vision tower for its real descriptions: 10 per set it holds
    when grouped by set, 10 per description otherwise, none from cached features (empty slots are not counted, as
    the evaluator does not count them; `flops_per_description` includes their work)."""
    if stages.FEATURES in batch:
        return 0
    real = np.asarray(batch["target"]) != imagecode.NO_TARGET
    if stages.SET_INDEX not in batch:
        return imagecode.NUM_CANDIDATES * int(real.sum())
    set_index = np.asarray(batch[stages.SET_INDEX])
    real = real.reshape(set_index.shape)
    sets = sum(len(np.unique(row[mask])) for row, mask in zip(set_index, real, strict=True))
    return imagecode.NUM_CANDIDATES * sets


def _train_pass(step: Callable[[dict[str, np.ndarray]], Any], dataset: Any, figures: dict[str, Any]) -> int:
    """One epoch of `dataset` through `step`: the real descriptions it held (padding slots have no target);
    `figures` gets the images encoded per description."""
    descriptions, images, last = 0, 0, None
    for batch in dataset:
        batch = dict(batch)
        batch.pop(SKIPPED_FIELD, None)
        descriptions += int((np.asarray(batch["target"]) != imagecode.NO_TARGET).sum())
        images += images_encoded(batch)
        last = step(batch)
    jax.block_until_ready(last)
    figures["images_encoded_per_description"] = round(images / max(descriptions, 1), 4)
    return descriptions


def jax_train_side(
    setup: PassSetup, root: str, grouped: bool, cached: bool, workdir: str, name: str = "jax", for_torch: bool = False
) -> tuple[Side, dict[str, np.ndarray]]:
    """One training epoch as the trainer runs it (its input, its jitted step, stage 2b's cache built first in
    `workdir` when `cached`); and, `for_torch`, the parameters at step 0 (numpy, dotted names) for PyTorch to
    start from and the FLOPs of the step on per-description batches (what PyTorch's side computes)."""
    config = pass_config(setup, root, grouped, cached)
    stage = stages.get(setup.step.stage)
    built, mesh = _jax_model(setup, config)
    params = {key: np.array(value) for key, value in {**built.trainable, **built.frozen}.items()} if for_torch else {}
    init = jax.jit(
        lambda t, f: TrainState(jnp.zeros((), jnp.int32), t, f, built.tx.init(t)),
        out_shardings=built.state_sharding,
        donate_argnums=(0, 1),
    )
    holder = {"state": init(built.trainable, built.frozen)}
    figures: dict[str, Any] = {}
    shards = parallel.batch_shards(mesh)
    train_input = inputs.train_input(config, stage, shards)
    layout = None if cached else aot.set_layout(config, stage, True, shards)  # as `train_input` lays it out
    if layout is not None:
        figures["set_slots"] = layout.set_slots * layout.groups
    if cached:
        began = time.perf_counter()
        train_input = features.train_input(config, built, holder["state"], mesh, workdir)
        figures["cache_build_s"] = round(time.perf_counter() - began, 2)
    first = dict(next(iter(train_input.dataset)))
    first.pop(SKIPPED_FIELD, None)
    first = make_global_batch(first, built.batch_sharding)
    began = time.perf_counter()
    compiled = built.train_step.trace(holder["state"], first).lower().compile()
    figures["compile_s"] = round(time.perf_counter() - began, 2)
    figures["estimated_memory_bytes"] = memory_estimate(compiled)
    logging.info("%s: train step compiled, %s bytes estimated", name, figures["estimated_memory_bytes"])
    per_step = hardware.program_flops(built.train_step.__wrapped__, *_abstract((holder["state"], first)))
    if for_torch:
        per_description = hardware.program_flops(
            built.train_step.__wrapped__, *_abstract((holder["state"], random_batch(setup.step)))
        )
        figures["flops_per_description_ungrouped"] = per_description / setup.step.descriptions
    holder["state"], metrics = compiled(holder["state"], first)  # warm: not timed
    jax.block_until_ready(metrics)
    logging.info("%s: train step compiled in %.1f s", name, figures["compile_s"])
    counted = {"steps": 0}

    def step(batch: dict[str, np.ndarray]) -> Any:
        holder["state"], metrics = compiled(holder["state"], make_global_batch(batch, built.batch_sharding))
        counted["steps"] += 1
        return metrics["loss"]

    def run() -> tuple[int, None]:
        counted["steps"] = 0
        descriptions = _train_pass(step, train_input.dataset, figures)
        figures["steps"] = counted["steps"]
        figures["flops_per_description"] = per_step * counted["steps"] / descriptions if per_step else None
        return descriptions, None

    return Side(name, run, figures, holder.clear), params


def torch_train_side(setup: PassSetup, root: str, params: dict[str, np.ndarray]) -> Side:
    """The authors' way of a stage 2a epoch: per-description batches (each description's 10 images decoded,
    augmented and encoded), PyTorch Adam on stage 2a's trainable parameters."""
    from contextblip_jax.benchmark import torch_steps  # torch is a development dependency

    config = pass_config(setup, root, grouped=False, cached=False)
    held = torch_steps.build_model(setup.step, params, config.optimizer, "cpu")
    train_input = inputs.train_input(config, stages.get(setup.step.stage))
    dtype = torch_steps.torch_dtype(setup.step.dtype)
    fields = ("images", "input_ids", "attention_mask", "target")
    counted = {"steps": 0}

    def step(batch: dict[str, np.ndarray]) -> Any:
        tensors = {name: torch_steps.torch.from_numpy(np.asarray(batch[name])) for name in fields}
        counted["steps"] += 1
        return torch_steps.make_torch_step(held, tensors, dtype, False)().numpy()

    figures: dict[str, Any] = {"compile_s": 0.0}

    def run() -> tuple[int, None]:
        counted["steps"] = 0
        descriptions = _train_pass(step, train_input.dataset, figures)
        figures["steps"] = counted["steps"]
        return descriptions, None

    def release() -> None:
        held.model, held.optimizer = None, None

    return Side("torch", run, figures, release)


def check_agreement(jax_outputs: dict[int, np.ndarray], torch_outputs: dict[int, np.ndarray], dtype: str) -> float:
    """The largest |PyTorch - JAX| score over every description (matched by example id); in float32 one over
    `AGREEMENT` stops the benchmark, as does a description one side did not score."""
    if set(jax_outputs) != set(torch_outputs):
        raise SystemExit(
            f"the frameworks scored different descriptions: {len(jax_outputs)} (JAX) against {len(torch_outputs)}"
        )
    worst = max(float(np.max(np.abs(torch_outputs[i] - jax_outputs[i]))) for i in jax_outputs)
    if dtype == "float32" and worst > AGREEMENT:
        raise SystemExit(
            f"PyTorch's scores differ from JAX's by up to {worst:.3g} (> {AGREEMENT}) on the same descriptions; "
            "no row is made"
        )
    return worst


def _timed(side: Side, seconds: list[float]) -> tuple[int, dict[int, np.ndarray] | None]:
    """One more pass of `side`, its wall time appended to `seconds`: (the descriptions it held, its outputs)."""
    began = time.perf_counter()
    descriptions, outputs = side.run()
    seconds.append(time.perf_counter() - began)
    logging.info("%s: a pass of %d descriptions in %.1f s", side.name, descriptions, seconds[-1])
    return descriptions, outputs


def _eval_passes(
    setup: PassSetup, root: str, grouped: bool, compare: tuple[str, ...], runs: int
) -> list[tuple[Side, list[float], int]]:
    """The evaluation sides, built together and timed in turns; after the first round every description's
    scores are compared (`check_agreement`), and a disagreement stops the benchmark before any row is made."""
    jax_side, params = jax_eval_side(setup, root, grouped)
    sides = [jax_side]
    if "torch" in compare:
        torch_side = torch_eval_side(setup, root, params)
        torch_side.figures["flops_per_description"] = jax_side.figures["flops_per_description_ungrouped"]
        sides.append(torch_side)
    del params
    seconds: list[list[float]] = [[] for _ in sides]
    counted = [0 for _ in sides]
    for round_index in range(runs):
        outputs = []
        for index, side in enumerate(sides):
            counted[index], scores = _timed(side, seconds[index])
            outputs.append(scores)
        if round_index == 0 and len(sides) > 1:
            difference = check_agreement(outputs[0], outputs[1], setup.step.dtype)
            sides[1].figures["max_score_difference_vs_jax"] = difference
    return list(zip(sides, seconds, counted, strict=True))


def _train_passes(
    setup: PassSetup,
    root: str,
    grouped: bool,
    cached: bool,
    compare: tuple[str, ...],
    folder: str,
    runs: int,
    warmup: int,
) -> list[tuple[Side, list[float], int]]:
    """The training sides one after another: each built, run `warmup` epochs untimed (a run trains many epochs in
    one process; its first is slower), timed and freed before the next is built."""
    kept: dict[str, dict[str, np.ndarray]] = {}

    def jax_side() -> Side:
        workdir = os.path.join(folder, "workdir")
        side, kept["params"] = jax_train_side(setup, root, grouped, cached, workdir, for_torch="torch" in compare)
        return side

    builders: list[Callable[[], Side]] = [jax_side]
    for name in compare:
        if name == "torch":
            builders.append(lambda: torch_train_side(setup, root, kept.pop("params")))
        else:
            builders.append(
                lambda: jax_train_side(setup, root, grouped, False, os.path.join(folder, "uncached"), "uncached")[0]
            )
    out = []
    for build in builders:
        side = build()
        if side.name == "torch":
            side.figures["flops_per_description"] = out[0][0].figures.get("flops_per_description_ungrouped")
        for _ in range(warmup):
            _timed(side, [])
        seconds: list[float] = []
        counted = 0
        for _ in range(runs):
            counted, _ = _timed(side, seconds)
        side.release()
        gc.collect()
        out.append((side, seconds, counted))
    return out


def pass_rows(setup: PassSetup, compare: tuple[str, ...] = (), runs: int = 3, warmup: int = 0) -> list[dict[str, Any]]:
    """One row per framework: the pass's `descriptions_per_s` (over the median of `runs` passes), `pass_s`,
    and on the JAX row `ratio_vs_<other>`; training passes follow `warmup` untimed ones (an evaluation pass is
    timed from its first call, as `evaluate` makes one); see the module docstring."""
    step = setup.step
    stage = stages.get(step.stage)
    check_compare(step, compare)
    grouped, cached = protocol_choice(setup)
    with tempfile.TemporaryDirectory() as folder:
        root = os.path.join(folder, "data")
        os.makedirs(root)
        sets, descriptions = subset_root(setup.root, setup.split, setup.limit_sets, root)
        logging.info(
            "a pass over %d sets (%d descriptions) of %s's %s split", sets, descriptions, setup.root, setup.split
        )
        if step.train:
            timed = _train_passes(setup, root, grouped, cached, compare, folder, runs, warmup)
        else:
            timed = _eval_passes(setup, root, grouped, compare, runs)
    rows = []
    for side, seconds, counted in timed:
        spread = hardware.spread(seconds)
        rows.append(
            {
                "framework": side.name,
                "measure": f"{'train' if step.train else 'eval'}_pass",
                "stage": stage.name,
                "split": setup.split,
                "protocol": setup.protocol,
                "sets": sets,
                "descriptions": counted,
                "batch_size": step.descriptions,
                "descriptions_per_s": round(counted / spread["median"], 4),
                "pass_s": spread,
                "warmup_passes": warmup if step.train else 0,
                "date": datetime.date.today().isoformat(),
                **side.figures,
            }
        )
    rows[0].update(group_by_set=grouped, cache_features=cached)
    for other in rows[1:]:
        other.update(group_by_set=grouped and other["framework"] != "torch", cache_features=False)
        ratio = rows[0]["descriptions_per_s"] / other["descriptions_per_s"]
        rows[0][f"ratio_vs_{other['framework']}"] = round(ratio, 3)
        if rows[0].get("flops_per_description") and other.get("flops_per_description"):
            flops = rows[0]["flops_per_description"] / other["flops_per_description"]
            rows[0][f"flops_ratio_vs_{other['framework']}"] = round(flops, 3)
    return rows


def check_compare(step: Setup, compare: tuple[str, ...]) -> None:
    """`--compare` for a pass: `torch` where PyTorch's side is ported, `uncached` for stage 2b's epoch."""
    unknown = sorted(set(compare) - set(PASS_FRAMEWORKS))
    if unknown:
        raise ValueError(f"a pass compares with {PASS_FRAMEWORKS}, got {unknown}")
    measure = "train" if step.train else "eval"
    if "torch" in compare:
        from contextblip_jax.benchmark import torch_steps  # torch is a development dependency

        if (measure, step.stage) not in torch_steps.PORTED:
            raise ValueError(
                "PyTorch's pass is ported for --measure=train --stage=finetune and --measure=eval --stage=zeroshot, "
                f"not --measure={measure} --stage={step.stage}"
            )
    if "uncached" in compare and not (step.train and stages.get(step.stage).features):
        raise ValueError(
            "--compare=uncached times stage 2b's epoch without cached features: --measure=train --stage=context"
        )
