"""The input pipeline beside the step: the images/s the grain pipeline delivers at the step's batch shape (its
descriptions x 10 candidates, the preset's image size), so that a reader sees whether input or compute bounds
training on the machine at hand.

The pipeline reads a temporary ImageCoDe-layout folder of photo-like JPEGs (`data/benchmark.py`: crops of a
bundled photograph at 640 x 480, quality 90; real ImageCoDe photos are larger and cost more to decode), without
training augmentation, with `workers` grain processes.

Imports: its own package (`benchmark`), `data`.
"""

from __future__ import annotations

import tempfile
from typing import Any

from contextblip_jax.data import pipeline
from contextblip_jax.data.benchmark import measure, write_photo_folder

PHOTO_SIZE = 640


def input_row(descriptions: int, image_size: int, workers: int, batches: int) -> dict[str, Any]:
    """One JSON row: the pipeline's images/s and descriptions/s over `batches` batches after the first."""
    with tempfile.TemporaryDirectory() as root:
        write_photo_folder(root, num_sets=20, photo_size=PHOTO_SIZE)
        config = pipeline.DataConfig(root=root, image_size=image_size, batch_size=descriptions, workers=workers)
        figures = measure(config, batches)
    return {
        "framework": "input_pipeline",
        "measure": "input",
        "data": f"{PHOTO_SIZE}x{PHOTO_SIZE * 3 // 4} JPEG photos",
        "image_size": image_size,
        "workers": workers,
        "images_per_s": figures["images_per_s"],
        "descriptions_per_s": figures["descriptions_per_s"],
        "batch_ms": figures["batch_ms"],
    }
