"""Generated IRCD data in the exact ImageCoDe layout: the data of the CPU main job and of the tests.

    python -m contextblip_jax.data.synthetic --root=PATH [--seed=0 --kinds=attributes:0.3,motion:0.7 ...]

Each set holds 10 small JPEGs of coloured shapes on a plain background; `scenes.py` defines the scene kinds
(`attributes`, `relation`: static; `motion`, `timeline`: video) and what a description means. Every description
is checked on the scene records to be true of its target and of no other image in the set.

Static sets are named `open-images-<n>_<hex>` with files img0..img9; video sets carry a video prefix and
non-contiguous frame numbers (img31, img38, img50, ...), so the target is the k-th frame in sorted order and
not img{k}.jpg, exactly as in ImageCoDe. At the default 64 px (48 px at least) the shapes can be read back from
the pixels exactly; JPEGs are written without chroma subsampling so that colours do not bleed between shapes.

Each set draws from its own generator, `np.random.default_rng([seed, set number])`, and its pixels from
another (`[seed, set number, 1]`): the same arguments write the same bytes, and `sample_sets` gives the scene
records without rendering anything. `ensure` caches a folder behind a manifest (`synthetic.json`: generator
version and arguments), so that a folder written by another version or with other arguments is never reused.

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from contextblip_jax.data import imagecode, scenes

COLOURS, SHAPES, POSITIONS, COUNTS, KINDS = scenes.COLOURS, scenes.SHAPES, scenes.POSITIONS, scenes.COUNTS, scenes.KINDS
"""The vocabulary of the descriptions, for readers of the generated data."""
VERSION = 3
"""Bumped whenever the same arguments would write different data."""
MANIFEST = "synthetic.json"
DEFAULT_KINDS = {"attributes": 0.3, "motion": 0.7}
IMAGECODE_MIX = {1: 1306, 2: 2745, 3: 3266}
"""ImageCoDe's training sets by their number of descriptions (2.27 per set), for `descriptions_mix="imagecode"`."""
VIDEO_PREFIXES = ("MSR-VTT-", "video-storytelling-", "YouCook-")
SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """One set's records: its scenes in frame order, frame numbers, and descriptions (and the queries they word)
    by target position."""

    name: str
    kind: str
    split: str
    scenes: list[scenes.Scene]
    frames: list[int]
    descriptions: dict[int, str]
    queries: dict[int, scenes.Query]


def parse_kinds(spec: str | Mapping[str, float]) -> dict[str, float]:
    """`"attributes:0.3,motion:0.7"` (or a mapping) -> normalised weights; unknown kinds are an error."""
    weights = dict(spec) if isinstance(spec, Mapping) else {}
    if isinstance(spec, str):
        for item in filter(None, spec.split(",")):
            name, _, weight = item.partition(":")
            weights[name.strip()] = float(weight or 1)
    unknown = sorted(set(weights) - set(KINDS))
    if unknown or not weights or min(weights.values()) < 0 or not sum(weights.values()):
        raise ValueError(f"kinds {spec!r}: expected positive weights over {KINDS}")
    total = sum(weights.values())
    return {name: weights[name] / total for name in KINDS if weights.get(name)}


def parse_mix(spec: str | Mapping[int, float]) -> dict[int, float] | None:
    """Shares of sets with 1, 2 and 3 descriptions: `"imagecode"` (`IMAGECODE_MIX`), `"1:1306,2:2745,3:3266"` or a
    mapping, normalised; empty means the generator's own uniform draw (None)."""
    if not spec:
        return None
    if spec == "imagecode":
        spec = IMAGECODE_MIX
    weights: dict[int, float] = {}
    if isinstance(spec, str):
        for item in filter(None, spec.split(",")):
            count, _, weight = item.partition(":")
            weights[int(count)] = float(weight or 1)
    else:
        weights = {int(count): float(weight) for count, weight in spec.items()}
    if set(weights) - {1, 2, 3} or min(weights.values(), default=-1) < 0 or not sum(weights.values()):
        raise ValueError(f"descriptions mix {spec!r}: expected 'imagecode' or positive weights of 1, 2 and 3")
    total = sum(weights.values())
    return {count: weights[count] / total for count in sorted(weights)}


def _frame_numbers(rng: np.random.Generator) -> list[int]:
    gaps = rng.integers(2, 15, size=scenes.NUM_FRAMES - 1)
    start = int(rng.integers(0, 300))
    return [start, *(start + np.cumsum(gaps)).tolist()]


def _descriptions(
    kind: str, frames: list[scenes.Scene], rng: np.random.Generator, mix: dict[int, float] | None
) -> dict[int, tuple[scenes.Query, str]]:
    """1-3 targets (uniformly, or drawn from `mix`), each with a query true of it and of no other frame, and its
    wording."""
    unique = {}
    for index in range(len(frames)):
        queries = [
            q
            for q in scenes.true_queries(kind, frames, index)
            if not any(scenes.holds(q, frames, j) for j in range(len(frames)) if j != index)
        ]
        if queries:
            unique[index] = queries
    targets = sorted(unique)
    wanted = int(rng.integers(1, 4)) if mix is None else int(rng.choice(list(mix), p=list(mix.values())))
    chosen = rng.choice(len(targets), min(wanted, len(targets)), replace=False)
    result = {}
    for i in chosen.tolist():
        queries = unique[targets[i]]
        query = queries[rng.integers(len(queries))]
        result[targets[i]] = (query, scenes.text(query, rng))
    return result


def sample_sets(
    seed: int = 0,
    num_train_sets: int = 400,
    num_valid_sets: int = 100,
    num_test_sets: int = 100,
    kinds: str | Mapping[str, float] = "",
    descriptions_mix: str | Mapping[int, float] = "",
) -> Iterator[ImageSet]:
    """Every set's records, in split order, without rendering (what `generate` writes)."""
    weights = parse_kinds(kinds or DEFAULT_KINDS)
    mix = parse_mix(descriptions_mix)
    names, probabilities = list(weights), list(weights.values())
    number = 0
    for split, num_sets in zip(SPLITS, (num_train_sets, num_valid_sets, num_test_sets), strict=True):
        for _ in range(num_sets):
            number += 1
            rng = np.random.default_rng([seed, number])
            kind = names[rng.choice(len(names), p=probabilities)]
            frames = scenes.SAMPLERS[kind](rng)
            if kind in scenes.VIDEO_KINDS:
                name = f"{VIDEO_PREFIXES[number % len(VIDEO_PREFIXES)]}synthetic{number:05d}"
                numbers = _frame_numbers(rng)
            else:
                name = f"{imagecode.STATIC_MARKER}-{number}_{rng.bytes(8).hex()}"
                numbers = list(range(scenes.NUM_FRAMES))
            described = _descriptions(kind, frames, rng, mix)
            texts = {target: text for target, (_, text) in described.items()}
            queries = {target: query for target, (query, _) in described.items()}
            yield ImageSet(name, kind, split, frames, numbers, texts, queries)


def _layout(
    image_set: ImageSet, size: int, rng: np.random.Generator
) -> tuple[tuple[int, int, int], list[list[tuple[scenes.Thing, scenes.Box]]]]:
    """A set's background colour and where each frame's shapes go, drawn from its pixel generator."""
    background = tuple(int(v) for v in rng.integers(200, 246, size=3))
    return background, [scenes.place(things, size, rng) for things in image_set.scenes]  # type: ignore[return-value]


def _write_set(root: str, image_set: ImageSet, size: int, rng: np.random.Generator) -> None:
    folder = imagecode.set_dir(root, image_set.name)
    os.makedirs(folder)
    background, frames = _layout(image_set, size, rng)
    for placed, frame in zip(frames, image_set.frames, strict=True):
        image = scenes.draw(placed, size, background)
        image.save(os.path.join(folder, f"img{frame}.jpg"), quality=95, subsampling=0)


@dataclasses.dataclass(frozen=True)
class SceneBoxes:
    """Where a generated folder's shapes are, as fractions of the image side: `described[(set name, target)]` the
    boxes of the shapes each description names on its target (`scenes.described`; empty when it names none in
    view), `frames[set name][k]` every shape's box on candidate k."""

    described: dict[tuple[str, int], list[scenes.Box]]
    frames: dict[str, list[list[scenes.Box]]]


def replayed(root: str) -> tuple[dict[str, Any], Iterator[ImageSet]] | None:
    """The manifest of a folder `ensure` wrote and its sets' records drawn again from the manifest's arguments
    (nothing rendered); None for any other folder, whose records are unknown."""
    path = os.path.join(root, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        found = json.load(f)
    if found.get("version") != VERSION or found.get("generator") != __name__:
        return None
    arguments = {name: found[name] for name in ("seed", "num_train_sets", "num_valid_sets", "num_test_sets")}
    return found, sample_sets(kinds=found["kinds"], descriptions_mix=found.get("descriptions_mix", ""), **arguments)


def set_kinds(root: str) -> dict[str, str] | None:
    """Each set's scene kind (`scenes.KINDS`) by set name, for a folder `ensure` wrote; None for any other."""
    found = replayed(root)
    return None if found is None else {image_set.name: image_set.kind for image_set in found[1]}


def scene_boxes(root: str) -> SceneBoxes | None:
    """The boxes of a folder `ensure` wrote, replayed from its manifest's arguments (the generator draws the same
    records and placements again, rendering nothing); None for any other folder: its records are unknown."""
    replay = replayed(root)
    if replay is None:
        return None
    found, sets = replay
    size = int(found["image_size"])
    result = SceneBoxes({}, {})
    for number, image_set in enumerate(sets, start=1):
        _, frames = _layout(image_set, size, np.random.default_rng([found["seed"], number, 1]))
        result.frames[image_set.name] = [[tuple(v / size for v in box) for _, box in placed] for placed in frames]
        for target, query in image_set.queries.items():
            named = set(scenes.described(query, image_set.scenes[target]))
            result.described[image_set.name, target] = [
                tuple(v / size for v in box) for thing, box in frames[target] if thing in named
            ]
    return result  # type: ignore[return-value]


def _clear(root: str, overwrite: bool) -> None:
    owned = [*imagecode.SPLIT_FILES.values(), imagecode.IMAGE_DIR, MANIFEST]
    existing = [p for p in owned if os.path.exists(os.path.join(root, p))]
    if existing and not overwrite:
        raise FileExistsError(f"{root} already holds {existing}; pass overwrite=True (--overwrite) to replace them")
    for name in existing:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def generate(
    root: str,
    seed: int = 0,
    num_train_sets: int = 400,
    num_valid_sets: int = 100,
    num_test_sets: int = 100,
    image_size: int = 64,
    kinds: str | Mapping[str, float] = "",
    overwrite: bool = False,
    descriptions_mix: str | Mapping[int, float] = "",
) -> dict[str, dict[str, int]]:
    """Writes the three split files and image-sets/ under `root`; returns the counts the doctor should print.
    `descriptions_mix`: how many sets get 1, 2 or 3 descriptions (`parse_mix`; "imagecode" for ImageCoDe's)."""
    os.makedirs(root, exist_ok=True)
    _clear(root, overwrite)
    annotations: dict[str, dict[str, object]] = {split: {} for split in SPLITS}
    fields = ("sets", "descriptions", "video_descriptions", "static_descriptions")
    counts = {split: dict.fromkeys(fields, 0) for split in SPLITS}
    sets = sample_sets(seed, num_train_sets, num_valid_sets, num_test_sets, kinds, descriptions_mix)
    for number, image_set in enumerate(sets, start=1):
        _write_set(root, image_set, image_size, np.random.default_rng([seed, number, 1]))
        texts = image_set.descriptions
        entry = list(texts.values()) if image_set.split == "test" else {str(t): d for t, d in texts.items()}
        annotations[image_set.split][image_set.name] = entry
        split_counts = counts[image_set.split]
        split_counts["sets"] += 1
        split_counts["descriptions"] += len(texts)
        video = image_set.kind in scenes.VIDEO_KINDS
        split_counts["video_descriptions" if video else "static_descriptions"] += len(texts)
    for split in SPLITS:
        with open(imagecode.split_path(root, split), "w", encoding="utf-8") as f:
            json.dump(annotations[split], f, indent=1)
    return counts


def manifest(**arguments: object) -> dict[str, object]:
    """What identifies a generated folder: the generator version and every argument of `generate`."""
    values = {"seed": 0, "num_train_sets": 400, "num_valid_sets": 100, "num_test_sets": 100, "image_size": 64}
    values.update(arguments)
    values["kinds"] = parse_kinds(values.get("kinds") or DEFAULT_KINDS)
    return {"generator": __name__, "version": VERSION, **values}


def ensure(root: str, **arguments: object) -> bool:
    """Generates the folder unless it holds data from these very arguments and this generator version; returns
    whether it generated. A folder with other arguments or another version (its manifest says so) is replaced;
    a folder with data but no manifest was not written by `ensure` and is an error, never overwritten."""
    wanted = manifest(**arguments)
    path = os.path.join(root, MANIFEST)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
        if found == wanted:
            return False
        changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        logging.warning("%s was generated with other settings (%s); generating it again", root, ", ".join(changed))
    elif os.path.exists(imagecode.split_path(root, "train")):
        raise FileExistsError(
            f"{root} holds ImageCoDe data without a {MANIFEST} manifest (an older generator, or data not generated "
            "here): delete it, or point data.root elsewhere (data.synthetic=0 uses a folder as it is)"
        )
    counts = generate(root, overwrite=True, **arguments)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(wanted, f, indent=1)
    logging.info("generated synthetic ImageCoDe data in %s: %s", root, counts)
    return True


def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    os.makedirs(_ROOT.value, exist_ok=True)
    counts = generate(
        _ROOT.value,
        seed=_SEED.value,
        num_train_sets=_TRAIN.value,
        num_valid_sets=_VALID.value,
        num_test_sets=_TEST.value,
        image_size=_SIZE.value,
        kinds=_KINDS.value,
        overwrite=_OVERWRITE.value,
        descriptions_mix=_MIX.value,
    )
    print(json.dumps({"root": _ROOT.value, "splits": counts}, indent=2))


if __name__ == "__main__":
    from absl import app, flags

    _ROOT = flags.DEFINE_string("root", None, "Folder to write the ImageCoDe layout into.", required=True)
    _SEED = flags.DEFINE_integer("seed", 0, "Seed of everything generated.")
    _TRAIN = flags.DEFINE_integer("train_sets", 400, "Image sets in train_data.json.")
    _VALID = flags.DEFINE_integer("valid_sets", 100, "Image sets in valid_data.json.")
    _TEST = flags.DEFINE_integer("test_sets", 100, "Image sets in test_data_unlabeled.json.")
    _SIZE = flags.DEFINE_integer("image_size", 64, "Side of the square JPEGs, in pixels.")
    _KINDS = flags.DEFINE_string(
        "kinds", "attributes:0.3,motion:0.7", f"Scene kinds and their shares, from {', '.join(KINDS)}."
    )
    _MIX = flags.DEFINE_string(
        "descriptions_mix",
        "",
        "Shares of sets with 1, 2 and 3 descriptions ('1:1306,2:2745,3:3266'; 'imagecode' for ImageCoDe's train "
        "split); empty: 1 to 3 uniformly.",
    )
    _OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the split files and image-sets/ if present.")
    app.run(_main)
