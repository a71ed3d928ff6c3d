"""Input throughput: images decoded, resized (and optionally augmented) per second by the grain pipeline.

    python -m contextblip_jax.data.benchmark [--root=IMAGECODE_DIR] --image_size=224 --workers=0,1,2

Prints one JSON object per worker count, after a one-thread loop doing the same work: the per-core ceiling, and
a probe of the machine's speed at that moment (shared CPUs vary from run to run).

Without `--root` it writes a temporary ImageCoDe-layout folder of photo-like JPEGs (crops of matplotlib's bundled
Grace Hopper photograph at `--photo_size`, quality 90), because the generated shape images are far cheaper to
decode than real ImageCoDe photos and video frames; `--synthetic` measures the CPU main job's generated data.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from contextblip_jax.data import imagecode, pipeline, synthetic
from contextblip_jax.data.augment import AugmentConfig
from contextblip_jax.data.preprocess import normalize_image, read_and_decode_jpeg

_BLIP_AUGMENT = {"random_resized_crop": True, "randaugment_layers": 2, "flip": "text_aware"}


def write_photo_folder(root: str, num_sets: int, photo_size: int, seed: int = 0) -> None:
    """The generated layout and descriptions, with every image replaced by a distinct photo crop."""
    from matplotlib import cbook

    synthetic.generate(root, seed=seed, num_train_sets=num_sets, num_valid_sets=0, num_test_sets=0, image_size=16)
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = Image.open(f).convert("RGB")
    rng = np.random.default_rng(seed)
    size = (photo_size, photo_size * 3 // 4)
    for name in os.listdir(os.path.join(root, imagecode.IMAGE_DIR)):
        for path in imagecode.list_set_images(root, name):
            left, top = rng.integers(0, 120), rng.integers(0, 150)
            crop = photo.crop((left, top, left + 380, top + 285)).resize(size, Image.Resampling.BICUBIC)
            crop.save(path, quality=90)


def measure_one_thread(root: str, image_size: int, images: int = 200) -> dict[str, float]:
    """The same decode + resize + normalise in a plain loop on one core: the per-core ceiling of the pipeline."""
    paths = [p for e in imagecode.read_split(root, "train")[: images // 10 + 1] for p in e.image_paths][:images]
    start = time.perf_counter()
    for path in paths:
        normalize_image(read_and_decode_jpeg(path), image_size)
    return {"images_per_s": round(len(paths) / (time.perf_counter() - start), 1)}


def measure(config: pipeline.DataConfig, batches: int) -> dict[str, float]:
    iterator = iter(pipeline.imagecode_dataset(config, "train", train=True))
    start = time.perf_counter()
    next(iterator)  # worker start-up and first batch
    warm = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - warm
    iterator.close()
    descriptions = batches * config.batch_size
    return {
        "images_per_s": round(descriptions * imagecode.NUM_CANDIDATES / elapsed, 1),
        "descriptions_per_s": round(descriptions / elapsed, 2),
        "batch_ms": round(1000 * elapsed / batches, 1),
        "startup_s": round(warm - start, 2),
    }


def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    with tempfile.TemporaryDirectory() as scratch:
        root = _ROOT.value
        if root is None and _SYNTHETIC.value:
            root = scratch
            synthetic.generate(root, num_train_sets=100, num_valid_sets=0, num_test_sets=0)
        elif root is None:
            root = scratch
            write_photo_folder(root, num_sets=60, photo_size=_PHOTO_SIZE.value)
        data = "synthetic" if _SYNTHETIC.value and not _ROOT.value else (_ROOT.value or "photos")
        baseline = {"measurement": "decode_resize_one_thread", "data": data, "image_size": _IMAGE_SIZE.value}
        print(json.dumps({**baseline, **measure_one_thread(root, _IMAGE_SIZE.value)}), flush=True)
        for workers in _WORKERS.value:
            config = pipeline.DataConfig(
                root=root,
                image_size=_IMAGE_SIZE.value,
                batch_size=_BATCH_SIZE.value,
                workers=int(workers),
                threads=_THREADS.value,
                jpeg_draft=_JPEG_DRAFT.value,
                augment=AugmentConfig(**_BLIP_AUGMENT) if _AUGMENT.value else AugmentConfig(),
            )
            result = {
                "measurement": "input_pipeline",
                "data": data,
                "photo_size": None if _ROOT.value or _SYNTHETIC.value else _PHOTO_SIZE.value,
                "image_size": config.image_size,
                "batch_size": config.batch_size,
                "workers": config.workers,
                "threads": config.threads,
                "augment": _AUGMENT.value,
                "jpeg_draft": config.jpeg_draft,
                "cpus": os.cpu_count(),
                **measure(config, _BATCHES.value),
            }
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    from absl import app, flags

    _ROOT = flags.DEFINE_string("root", None, "ImageCoDe folder; default: a temporary folder of photo crops.")
    _SYNTHETIC = flags.DEFINE_bool("synthetic", False, "Without --root: measure generated shape images instead.")
    _PHOTO_SIZE = flags.DEFINE_integer("photo_size", 640, "Width of the temporary photos (height = 3/4 of it).")
    _IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Model input size.")
    _BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Descriptions per batch (x10 images).")
    _BATCHES = flags.DEFINE_integer("batches", 10, "Timed batches after one warm-up batch.")
    _WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts to measure.")
    _THREADS = flags.DEFINE_integer("threads", 2, "Decoding threads per process.")
    _AUGMENT = flags.DEFINE_bool("augment", False, "Add BLIP-style training augmentation.")
    _JPEG_DRAFT = flags.DEFINE_bool("jpeg_draft", False, "Let libjpeg decode at reduced scale.")
    app.run(_main)
