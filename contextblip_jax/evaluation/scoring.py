"""Scoring ImageCoDe splits: predictions gathered over hosts, accuracy overall / video / static, and the
leaderboard file. Used by the trainer's periodic evaluation and by `python -m contextblip_jax.evaluate`.

Imports: its own package (`evaluation`), `data`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np

from contextblip_jax.data import grouped, imagecode
from contextblip_jax.data.pipeline import make_global_batch

LEADERBOARD_FILE = "test_predictions.json"


def collect(
    fn: Callable[[Mapping[str, jax.Array]], jax.Array],
    batches: Iterable[Mapping[str, np.ndarray]],
    sharding: jax.sharding.NamedSharding,
) -> dict[str, np.ndarray]:
    """`fn`'s output (`output`, one row per description) and the example fields of every real example of a pass
    (padding dropped), on every host.

    The outputs and the example fields travel as global arrays and are replicated together, so rows stay aligned
    whatever the number of hosts.
    """
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    gather = jax.jit(lambda tree: tree, out_shardings=replicated)
    fields = ("example_id", "target", "is_video")
    columns: dict[str, list[np.ndarray]] = {"output": [], **{name: [] for name in fields}}
    for batch in batches:
        inputs = make_global_batch(batch, sharding)
        gathered = jax.device_get(gather({"output": fn(inputs), **{name: inputs[name] for name in fields}}))
        for name, value in gathered.items():
            columns[name].append(np.asarray(value))
    result = {name: np.concatenate(parts) if parts else np.zeros(0, np.int64) for name, parts in columns.items()}
    real = result["example_id"] >= 0
    return {name: value[real] for name, value in result.items()}


def score_split(
    predict: Callable[[Mapping[str, jax.Array]], jax.Array],
    batches: Iterable[Mapping[str, np.ndarray]],
    sharding: jax.sharding.NamedSharding,
) -> dict[str, np.ndarray]:
    """Predictions (the argmax of `predict`'s scores) for every real example of an evaluation pass, on every
    host (`collect`)."""
    collected = collect(predict, batches, sharding)
    scores = collected.pop("output")
    return {"prediction": scores.argmax(axis=-1) if scores.size else np.zeros(0, np.int64), **collected}


METRICS = ("acc", "acc_video", "acc_static", "descriptions")
"""The fields of a validation row that `best.metric` may compare (`accuracy`)."""


def accuracy(scored: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Accuracy overall, on video sets and on static sets (fractions), as the contract's valid rows."""
    labelled = scored["target"] >= 0
    correct = (scored["prediction"] == scored["target"])[labelled]
    video = scored["is_video"][labelled].astype(bool)

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if values.size else float("nan")

    return {
        "acc": mean(correct),
        "acc_video": mean(correct[video]),
        "acc_static": mean(correct[~video]),
        "descriptions": int(labelled.sum()),
    }


def accuracy_by(
    scored: Mapping[str, np.ndarray], examples: list[imagecode.Example], group: Mapping[str, str]
) -> dict[str, float]:
    """Accuracy per group of sets (`group`: set name -> its group, e.g. generated data's scene kind), over the
    labelled descriptions; groups in sorted order."""
    found: dict[str, list[bool]] = {}
    rows = zip(scored["example_id"], scored["prediction"], scored["target"], strict=True)
    for example_id, prediction, target in rows:
        if target >= 0:
            name = group[examples[int(example_id)].set_name]
            found.setdefault(name, []).append(bool(prediction == target))
    return {name: float(np.mean(found[name])) for name in sorted(found)}


def leaderboard(scored: Mapping[str, np.ndarray], examples: list[imagecode.Example]) -> dict[str, list[int]]:
    """`{set_name: [predicted index per description, in file order]}` for a submission."""
    order = np.argsort(scored["example_id"])
    entries: dict[str, list[tuple[int, int]]] = {}
    for i in order:
        example = examples[int(scored["example_id"][i])]
        entries.setdefault(example.set_name, []).append((example.description_index, int(scored["prediction"][i])))
    return {name: [p for _, p in sorted(pairs)] for name, pairs in entries.items()}


def score_mmvp(
    predict: Callable[[Mapping[str, jax.Array]], jax.Array],
    pairs: list,
    tokenize: Callable[[list[str]], tuple[np.ndarray, np.ndarray]],
    load: Callable[[str], np.ndarray],
    group_by_set: bool = True,
) -> dict[str, float]:
    """MMVP-VLM pair accuracy per category, overall (`all`) and the mean over categories (`mean`).

    Each statement is a description whose candidates are the pair's two images; a pair counts when both
    statements score their own image higher. `group_by_set`: the two statements read one encoding of the two
    images (a set of two, `data/grouped.py`) instead of each encoding them again."""
    from contextblip_jax.data import mmvp

    scores = []
    for pair in pairs:
        images = np.stack([load(path) for path in pair.image_paths])
        ids, mask = tokenize(list(pair.texts))
        batch = {"input_ids": ids, "attention_mask": mask, "is_video": np.zeros(2, bool)}
        if group_by_set:
            batch.update({"images": images[None], grouped.SET_INDEX: np.zeros((1, 2), np.int32)})
        else:
            batch["images"] = np.broadcast_to(images, (2, *images.shape))
        scores.append(np.asarray(jax.device_get(predict(batch))))
    result = mmvp.accuracy(pairs, scores)
    categories = [value for name, value in result.items() if name != "all"]
    return {**result, "mean": float(np.mean(categories)) if categories else float("nan")}
