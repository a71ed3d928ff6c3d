"""What the model looked at in one set: every candidate's heatmap for each of its descriptions
(`models/gradcam.py`), drawn over the images, and the ranked grid `predict --explain` writes.

    texts = Texts(data)                                   # the run's cleaning and tokenisation (or the defaults)
    found = set_heatmaps(model, "finetune", paths, texts(["the red square ..."]), image_size, layer=-1)
    overlay(paths[0], found.maps[0, 0] / found.maps[0].max()).save("img0.png")

A set's maps are scaled together (by their largest value over its 10 candidates), so a brighter candidate drew
more of the gradient-weighted attention than a dimmer one.

Imports: its own package (`evaluation`), `data`, `models`, `stages`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from contextblip_jax import stages
from contextblip_jax.data.pipeline import DataConfig
from contextblip_jax.data.preprocess import BlipTokenizer, load_image
from contextblip_jax.data.text_cleaning import clean
from contextblip_jax.models import gradcam
from contextblip_jax.models.contextblip import ContextBLIP

TILE = 160
"""Side in pixels of one drawn candidate."""
ALPHA = 0.6
"""Weight of the heatmap's colours over the image where the map is highest; where it is 0 the image shows as it
is."""


class Texts:
    """Descriptions cleaned and tokenised as the run's own were (`data`), or as given with the bundled vocabulary,
    `[ENC]` first and `max_length` tokens when there is no run config."""

    def __init__(self, data: DataConfig | None, max_length: int = 64):
        self.data = data
        self.max_length = data.max_text_length if data else max_length
        self._tokenizer = BlipTokenizer(data.vocab if data else None)

    def __call__(self, texts: Sequence[str], max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        data = self.data
        cleaned = [clean(text, data.pre_caption_words, data.pre_caption_rules) if data else text for text in texts]
        return self._tokenizer(cleaned, max_length or self.max_length, data.first_token if data else "enc")


def set_heatmaps(
    model: ContextBLIP,
    stage: str,
    image_paths: Sequence[str],
    tokens: tuple[np.ndarray, np.ndarray],
    image_size: int,
    layer: int = -1,
    rule: str = "gradcam",
) -> gradcam.Heatmaps:
    """Maps [descriptions, candidates, grid, grid] of one set's images for its tokenised descriptions, the images
    encoded once for all of them; `stage` names the score explained (`stages.Stage.match`), `rule` the map
    (`gradcam.RULES`)."""
    match = stages.get(stage).match
    if match is None:
        raise ValueError(f"stage {stage!r} scores no candidates: there is nothing to explain")
    ids, mask = tokens
    images = jnp.asarray(np.stack([load_image(path, image_size) for path in image_paths]))[None]
    set_index = jnp.zeros((1, len(ids)), jnp.int32)
    return gradcam.heatmaps(model, match, images, jnp.asarray(ids), jnp.asarray(mask), layer, set_index, rule)


def scaled(maps: np.ndarray) -> np.ndarray:
    """A set's maps [candidates, grid, grid] over [0, 1], by their common maximum (all zero stays zero)."""
    top = float(maps.max()) if maps.size else 0.0
    return maps / top if top > 0 else np.zeros_like(maps)


def overlay(image_path: str, heat: np.ndarray, side: int = TILE) -> Image.Image:
    """The image at `side` pixels with `heat` [grid, grid] (in [0, 1]) upsampled bilinearly over it in the `jet`
    colours, each pixel's colour weighted by its heat (`ALPHA` at the top)."""
    from matplotlib import colormaps

    with Image.open(image_path) as image:
        base = np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), np.float32)
    grid = Image.fromarray(np.asarray(heat, np.float32), mode="F").resize((side, side), Image.Resampling.BILINEAR)
    heat_up = np.clip(np.asarray(grid), 0.0, 1.0)
    colours = colormaps["jet"](heat_up)[..., :3] * 255.0
    weight = ALPHA * heat_up[..., None]
    mixed = (1.0 - weight) * base + weight * colours
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


def ranked_grid(
    path: str,
    text: str,
    image_paths: Sequence[str],
    scores: np.ndarray,
    maps: np.ndarray,
    names: Sequence[str] | None = None,
) -> None:
    """Writes the candidates best first (two rows of five, each with its rank, file name and score, its heatmap
    over it) under the description, as one PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    names = list(names or [p.rsplit("/", 1)[-1] for p in image_paths])
    heat = scaled(maps)
    order = np.argsort(-scores)
    columns = 5
    rows = -(-len(order) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows + 0.6), squeeze=False)
    for slot, axis in enumerate(axes.flat):
        axis.axis("off")
        if slot < len(order):
            i = int(order[slot])
            axis.imshow(overlay(image_paths[i], heat[i]))
            axis.set_title(f"{slot + 1}. {names[i]}\n{scores[i]:.3f}", fontsize=9)
    figure.suptitle(text, fontsize=10, wrap=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
