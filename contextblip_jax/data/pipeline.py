"""The grain input pipeline: per-host shards, seeded shuffle, worker processes, batches, resumable iterators.

    config = DataConfig.from_config(cfg)             # an ml_collections config with a `data` field, or kwargs
    it = iter(imagecode_dataset(config, "train", train=True))
    batch = next(it)                                 # numpy, this host's share of the global batch
    global_batch = make_global_batch(batch, NamedSharding(mesh, P(("data", "fsdp"))))
    state = it.get_state()                           # save with the train state; it.set_state(state) resumes

Order of operations, and why:
1. source (folder or array_record records; same elements), evaluation pads to a multiple of the global batch so
   that every host gets the same number of full batches;
2. `seed(data.seed)`, global shuffle (training), `repeat(data.num_epochs)` (a new order each epoch);
3. decode/augment/tokenise (`transforms.py`), declared on the global order so that each element's random
   generator is seeded from the seed and its global position (hosts draw independently; every epoch differs);
4. per-host shard `[process_index::process_count]` of that global order: each example of an epoch goes to one
   host, and the hosts' i-th local batches together form global batch i;
5. batches of `data.batch_size / process_count` formed on that indexable dataset, so batch j is a fixed set of
   positions; `data.threads` threads per process and `data.workers` processes each build whole batches, which
   grain merges back in order. Batches therefore do not depend on the worker or thread count, and workers send
   one message per batch (per-example messages gave about half the throughput with 1-2 workers at 224 px).

The batch sequence is a function of the data, the seed and the host count; resuming needs the same three.
Because batches are fixed sets of positions, a training example whose image fails to decode under
`on_error="skip"` is replaced by the next decodable example of the source (logged and counted), not dropped.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from contextblip_jax.data import captions, grouped, imagecode, set_sampler, text_cleaning, transforms
from contextblip_jax.data.augment import AugmentConfig
from contextblip_jax.data.errors import check_on_error

SOURCES = ("folder", "tfds")
CAPTION_SAMPLING = ("image", "caption")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data`. Field by field:

    root: ImageCoDe folder (train_data.json, valid_data.json, test_data_unlabeled.json, image-sets/), or for
        captions the image root. source: "folder" reads it directly; "tfds" reads `records.py`'s array_record
        files from tfds_dir. annotations: BLIP caption JSON files (captions only).
    caption_sampling (captions only): "image", one example per image, a caption drawn per visit; "caption", one
        example per (image, caption) pair, so an epoch is one pass over the captions as in the authors' stage 1
        (needs source "folder"; the epoch length is the caption count).
    on_error: "raise" or "skip" damaged examples, also images lost while a run is in progress (counted in the
        logs and in the train rows' `skipped_examples`, a run total kept in its checkpoints).
    image_size: square side after the bicubic resize. max_text_length: tokens, 64 for ImageCoDe (30 truncates
        about 16% of its descriptions). first_token: "enc" ([ENC], ITM) or "cls".
    batch_size: global batch (descriptions for ImageCoDe), divided evenly among hosts.
    workers: grain worker processes (0: decode in the main process). threads: batches decoded concurrently per
        process. prefetch: batches buffered per process (each B/hosts x 10 x S x S x 3 float32: 217 MB at
        B=36, 224 px). worker_buffer: batches each worker process queues.
    seed: shuffle and augmentation seed. shuffle: training order shuffled. num_epochs: training epochs, None =
        forever. jpeg_draft: let libjpeg decode large JPEGs at reduced scale (faster, not bit-exact).
    vocab: tokenizer source (see `BlipTokenizer`), None = bundled bert-base-uncased.
    pre_caption_words: 0 tokenises texts as given; N > 0 first cleans each text with the authors' fine-tuning
        `pre_caption(text, N)` (`text_cleaning.py`; they use 30): descriptions and captions here, `predict.py
        --config`'s text, MMVP statements read with `mmvp.read_pairs(..., pre_caption_words=N)`.
        pre_caption_rules: "albef" (the authors' fine-tuning and evaluation rules: punctuation deleted) or "blip"
        (their stage-1 reader's: `.!"()*#:;~` become spaces, `,'?-/` stay).
    group_by_set (training, ImageCoDe): batches of whole sets, each set's images decoded, augmented (one draw)
        and encoded once for all its descriptions (`set_sampler.py`); needs the folder source and one draw per
        example (not augment.per_image). set_slots: sets per global batch (0: per data shard its descriptions
        over ImageCoDe's 2.27 per set, rounded; `grouped.Layout.of`).
    augment: `AugmentConfig` fields (random_resized_crop, crop_scale, crop_ratio, randaugment_layers,
        randaugment_magnitude, ops "project"|"blip", flip "off"|"text_aware"|"plain", flip_probability,
        per_image: one draw per image instead of one per example), training only.
    """

    root: str = ""
    source: str = "folder"
    tfds_dir: str = ""
    annotations: tuple[str, ...] = ()
    on_error: str = "raise"
    image_size: int = 224
    max_text_length: int = 64
    first_token: str = "enc"
    batch_size: int = 36
    workers: int = 0
    threads: int = 2
    prefetch: int = 2
    worker_buffer: int = 1
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    jpeg_draft: bool = False
    vocab: str | None = None
    pre_caption_words: int = 0
    pre_caption_rules: str = "albef"
    caption_sampling: str = "image"
    group_by_set: bool = False
    set_slots: int = 0
    augment: AugmentConfig | Mapping[str, Any] = dataclasses.field(default_factory=AugmentConfig)

    def __post_init__(self):
        if not isinstance(self.augment, AugmentConfig):  # a mapping or ConfigDict of AugmentConfig fields
            object.__setattr__(self, "augment", _augment_config(self.augment))
        object.__setattr__(self, "annotations", tuple(self.annotations))
        check_on_error(self.on_error)
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        for name in ("image_size", "max_text_length", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.workers < 0 or self.threads < 0 or self.prefetch < 0:
            raise ValueError("data.workers, data.threads and data.prefetch must be >= 0")
        if self.pre_caption_words < 0:
            raise ValueError(f"data.pre_caption_words must be >= 0 (0: no cleaning), got {self.pre_caption_words}")
        if self.pre_caption_rules not in text_cleaning.RULES:
            raise ValueError(
                f"data.pre_caption_rules must be one of {text_cleaning.RULES}, got {self.pre_caption_rules!r}"
            )
        if self.group_by_set and self.augment.per_image:
            raise ValueError(
                "data.group_by_set shares one augmentation draw among a set's descriptions: it cannot be combined "
                "with data.augment.per_image (draws per image and per description, the authors' recipe)"
            )
        if self.set_slots < 0:
            raise ValueError(f"data.set_slots {self.set_slots} must be 0 (automatic) or positive")
        if self.caption_sampling not in CAPTION_SAMPLING:
            raise ValueError(f"data.caption_sampling must be one of {CAPTION_SAMPLING}, got {self.caption_sampling!r}")

    @classmethod
    def from_config(cls, config: Any = None, **overrides: Any) -> DataConfig:
        """From a whole config (uses its `data` field), a data config, a mapping, or keyword arguments.

        Unknown fields are an error naming them: a misspelt option must not be silently ignored.
        """
        if config is not None and hasattr(config, "data"):
            config = config.data
        values = dict(config.to_dict() if hasattr(config, "to_dict") else (config or {}))
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(values) - known):
            raise ValueError(f"unknown data config field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def _augment_config(values: Any) -> AugmentConfig:
    values = dict(values.to_dict() if hasattr(values, "to_dict") else (values or {}))
    if unknown := sorted(set(values) - {f.name for f in dataclasses.fields(AugmentConfig)}):
        raise ValueError(f"unknown data.augment field(s) {unknown}")
    return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def host_shard(shard_index: int | None = None, shard_count: int | None = None) -> tuple[int, int]:
    """This host's shard: (jax.process_index(), jax.process_count()) unless given (tests simulate hosts)."""
    index = jax.process_index() if shard_index is None else shard_index
    count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    return index, count


def imagecode_source(config: DataConfig, split: str):
    """The grain source of a split: the folder itself or the built array_record files (identical elements)."""
    if config.source == "tfds":
        from contextblip_jax.data import records  # TFDS is imported only by runs that read records (seconds)

        return records.ImageCodeRecords(config.tfds_dir, split)
    return imagecode.ImageCodeSource(config.root, split, config.on_error)


def caption_source(config: DataConfig):
    """Stage 1's source: one element per image, or per (image, caption) pair under `caption_sampling="caption"`."""
    per_caption = config.caption_sampling == "caption"
    if config.source == "tfds":
        if per_caption:  # records hold one image each; indexing their captions would read every record's JPEG
            raise ValueError('data.caption_sampling="caption" needs data.source="folder" (records are per image)')
        from contextblip_jax.data import records

        return records.CaptionRecords(config.tfds_dir, "train")
    return captions.CaptionSource(config.annotations, config.root, config.on_error, per_caption)


def _prepare_kwargs(config: DataConfig, train: bool) -> dict[str, Any]:
    return {
        "image_size": config.image_size,
        "max_text_length": config.max_text_length,
        "first_token": config.first_token,
        "augment": config.augment,
        "train": train,
        "on_error": config.on_error,
        "jpeg_draft": config.jpeg_draft,
        "vocab": config.vocab,
        "pre_caption_words": config.pre_caption_words,
        "pre_caption_rules": config.pre_caption_rules,
    }


def build_dataset(
    source: Any, transform: transforms.Prepare, config: DataConfig, train: bool, shard: tuple[int, int]
) -> grain.IterDataset:
    """The shared pipeline of the module docstring, over any random-access source and per-example transform."""
    index, count = shard
    per_host = host_batch_size(config, count)
    transform = dataclasses.replace(transform, source=source)  # where skipped training examples get replaced
    ds = grain.MapDataset.source(source)
    if not train:
        padding = -len(ds) % config.batch_size
        if padding:
            ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([transforms.PADDING] * padding)])
    ds = training_order(ds, config) if train else ds.seed(config.seed)
    ds = ds.random_map(transform) if train else ds.map(transform)  # lazy: runs only on this host's elements
    return read_ahead(ds[index::count].batch(per_host, drop_remainder=train), config)


def host_batch_size(config: DataConfig, hosts: int) -> int:
    """Each host's share of `data.batch_size`; a batch the hosts cannot split evenly is refused."""
    if config.batch_size % hosts:
        raise ValueError(f"data.batch_size {config.batch_size} is not divisible by the {hosts} hosts")
    return config.batch_size // hosts


def training_order(ds: grain.MapDataset, config: DataConfig) -> grain.MapDataset:
    """Seeded by `data.seed`, shuffled (`data.shuffle`) and repeated `data.num_epochs` times, a new order each
    epoch: step 2 of the module docstring, for examples and for stage 2b's cached rows alike."""
    ds = ds.seed(config.seed)
    if config.shuffle:
        ds = ds.shuffle()
    return ds.repeat(config.num_epochs)


def read_ahead(ds: grain.MapDataset, config: DataConfig) -> grain.IterDataset:
    """Batches decoded ahead: `data.threads` threads and `data.prefetch` batches in the main process, or
    `data.workers` worker processes. Every pipeline ends here, so none holds more batches than these allow."""
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.threads, prefetch_buffer_size=config.prefetch))
    if config.workers:
        if not flags.FLAGS.is_parsed():  # grain's worker start reads its absl flags; outside an absl app
            flags.FLAGS.mark_as_parsed()  # (pytest, notebooks) nothing parsed them, so take their defaults
        options = grain.MultiprocessingOptions(num_workers=config.workers, per_worker_buffer_size=config.worker_buffer)
        ds = ds.mp_prefetch(options)
    return ds


def imagecode_dataset(
    config: DataConfig,
    split: str,
    train: bool,
    shard_index: int | None = None,
    shard_count: int | None = None,
    source: Any = None,
) -> grain.IterDataset:
    """Batches of B descriptions x 10 images for this host (see `transforms.py` for the fields).

    train=True: shuffled, repeated, augmented, incomplete last batch dropped. train=False: file order, one pass,
    padded with example_id -1 to whole global batches, so every example is seen exactly once.
    """
    source = imagecode_source(config, split) if source is None else source
    transform = transforms.PrepareImageCode(**_prepare_kwargs(config, train))
    return build_dataset(source, transform, config, train, host_shard(shard_index, shard_count))


def grouped_imagecode_dataset(
    config: DataConfig,
    source: Any,
    layout: grouped.Layout,
    batches: list,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Evaluation batches grouped by set (`grouped.py`), one pass in file order, over a source that lists its
    examples (the folder source): `batches` is `grouped.plan`'s, the same on every host."""
    transform = transforms.PrepareImageCode(**_prepare_kwargs(config, train=False))
    shard = host_shard(shard_index, shard_count)
    return read_ahead(grouped.grouped_batches(transform, source, source.examples, layout, batches, shard), config)


def grouped_train_dataset(
    config: DataConfig,
    source: Any,
    layout: grouped.Layout,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Training batches grouped by set (`set_sampler.py`), shuffled, repeated and augmented, over a source that
    lists its examples (the folder source). Each global group draws its augmentation from the seed and its
    global position, so the batches do not depend on the host, worker or thread count."""
    if not hasattr(source, "examples"):
        raise ValueError('data.group_by_set needs data.source="folder": the records source does not list its sets')
    index, count = host_shard(shard_index, shard_count)
    per_host = layout.per_host(count)
    plan = set_sampler.SetGroups(
        grouped.set_members(source.examples), layout, config.seed, config.shuffle, config.num_epochs
    )
    transform = transforms.PrepareImageCode(**_prepare_kwargs(config, train=True))
    prepare = grouped.PrepareGroup(transform, source, source.examples, layout)
    ds = grain.MapDataset.source(plan).seed(config.seed).random_map(prepare)
    return read_ahead(ds.batch(per_host)[index::count].map(grouped.merge_groups), config)


@dataclasses.dataclass(frozen=True)
class ArrayRows:
    """A grain source over arrays that share their first dimension: element i is row i of each."""

    arrays: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {name: np.asarray(value[index]) for name, value in self.arrays.items()}


def array_dataset(
    arrays: Mapping[str, np.ndarray],
    config: DataConfig,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """Training batches of rows of `arrays` (stage 2b's cached features), in the order and host split
    `build_dataset` gives examples (`training_order`). Rows need no decoding, so no worker processes read them."""
    index, count = host_shard(shard_index, shard_count)
    per_host = host_batch_size(config, count)
    ds = training_order(grain.MapDataset.source(ArrayRows(arrays)), config)
    return read_ahead(ds[index::count].batch(per_host, drop_remainder=True), dataclasses.replace(config, workers=0))


def captions_dataset(
    config: DataConfig,
    train: bool,
    shard_index: int | None = None,
    shard_count: int | None = None,
    source: Any = None,
) -> grain.IterDataset:
    """Batches of B captioned images for stage 1 (images [B, S, S, 3])."""
    source = caption_source(config) if source is None else source
    transform = transforms.PrepareCaption(**_prepare_kwargs(config, train))
    return build_dataset(source, transform, config, train, host_shard(shard_index, shard_count))


def make_global_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """Global `jax.Array`s from this host's batch; `sharding` splits dimension 0 over the mesh's batch axes.

    A spec naming only the batch axes (e.g. `P(("data", "fsdp"))`) also fits the images' extra dimensions:
    they stay whole, and mesh axes the spec leaves out (e.g. `tensor`) hold replicas.
    """
    return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for name, value in batch.items()}
