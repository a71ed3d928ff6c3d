"""The report's page: its plots (matplotlib PNGs) and `index.html`, a static page that reads only the files beside
it, so it opens from `file://` with no network.

Every shown description is a `section.card` holding its 10 candidates as `figure.candidate` in set order; the
target carries the class `target`, a wrong prediction `predicted` (the browser test counts these).

Imports: its own package (`evaluation`), `data`.
"""

from __future__ import annotations

import html
import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from contextblip_jax.data import imagecode
from contextblip_jax.evaluation import explain

LENGTH_EDGES = (0, 5, 10, 15, 20, 30, 50)
"""Description length bins, in words: [0, 5), [5, 10), ... and 50 or more."""

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }
.plots img { max-width: 32%; margin-right: 1%; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em; margin: 1em 0; }
.candidates { display: flex; flex-wrap: wrap; gap: 6px; }
.candidate { margin: 0; padding: 3px; border: 3px solid transparent; text-align: center; font-size: 0.8em; }
.candidate.target { border-color: #2a2; } .candidate.predicted { border-color: #d22; }
.candidate img { display: block; width: 108px; height: 108px; }
"""


def plots(
    out: str,
    rows: Sequence[imagecode.Example],
    predictions: np.ndarray,
    targets: np.ndarray,
    ranks: np.ndarray,
) -> list[tuple[str, str]]:
    """Draws the breakdowns into `out/plots/`; returns (file relative to `out`, caption) for each."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    correct = predictions == targets
    words = np.array([len(row.description.split()) for row in rows])
    edges = [*LENGTH_EDGES, np.inf]
    bins = [(lo, hi) for lo, hi in itertools.pairwise(edges) if ((words >= lo) & (words < hi)).any()]
    length_labels = [f"{lo}-{hi - 1}" if np.isfinite(hi) else f"{lo}+" for lo, hi in bins]
    by_length = [correct[(words >= lo) & (words < hi)] for lo, hi in bins]
    by_position = [correct[targets == k] for k in range(imagecode.NUM_CANDIDATES)]
    video = np.array([row.is_video for row in rows], bool)
    distance = np.abs(predictions - targets)[video]
    made = []

    def bars(name: str, caption: str, labels: list[str], groups: list[np.ndarray], xlabel: str) -> None:
        figure, axis = pyplot.subplots(figsize=(5, 3.2))
        values = [float(g.mean()) if g.size else 0.0 for g in groups]
        axis.bar(labels, values, color="#4a7bd0")
        for x, (value, group) in enumerate(zip(values, groups, strict=True)):
            axis.text(x, value + 0.02, f"n={group.size}", ha="center", fontsize=7)
        axis.set_ylim(0, 1.1)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("accuracy")
        axis.set_title(caption, fontsize=10)
        figure.tight_layout()
        figure.savefig(os.path.join(out, "plots", name), dpi=90)
        pyplot.close(figure)
        made.append((f"plots/{name}", caption))

    bars("by_length.png", "Accuracy by description length", length_labels, by_length, "words")
    bars("by_position.png", "Accuracy by target position", [str(k) for k in range(10)], by_position, "target index")
    figure, axis = pyplot.subplots(figsize=(5, 3.2))
    axis.hist(distance, bins=np.arange(0, imagecode.NUM_CANDIDATES + 1) - 0.5, color="#d0844a")
    axis.set_xlabel("|predicted frame - target frame| (0: correct)")
    axis.set_ylabel("video descriptions")
    axis.set_title(f"Video sets: frame distance (n={distance.size})", fontsize=10)
    figure.tight_layout()
    figure.savefig(os.path.join(out, "plots", "video_distance.png"), dpi=90)
    pyplot.close(figure)
    made.append(("plots/video_distance.png", "Video sets: distance between predicted and target frame"))
    return made


def write(out: str, summary: Mapping[str, Any], cards: Sequence[Any], plots: Sequence[tuple[str, str]]) -> None:
    """Writes the cards' images and `index.html` into `out`."""
    sections = [_card(out, n, card) for n, card in enumerate(cards)]
    figures = "".join(f'<img src="{src}" alt="{html.escape(caption)}">' for src, caption in plots)
    accuracy = "".join(
        f"<tr><th>{name}</th><td>{summary[key]:.3f}</td></tr>"
        for name, key in (("overall", "acc"), ("video", "acc_video"), ("static", "acc_static"))
        if summary[key] == summary[key]
    )
    about = ", ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in summary.items() if k in _ABOUT)
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>ContextBLIP evaluation report</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>ContextBLIP evaluation report</h1>",
        f"<p>{about}; {summary['descriptions']} labelled descriptions.</p>",
        f"<table>{accuracy}</table>",
        f'<div class="plots">{figures}</div>',
        _pointing(summary.get("pointing")),
        "<h2>Descriptions</h2>",
        "<p>Candidates in set order; green: the target, red: a wrong prediction. Each candidate shows its rank and "
        "score, and over it the heatmap of what the matching pass looked at (gradient-weighted cross-attention at "
        f"text layer {summary['heatmap_layer']}, rule {summary['heatmap_rule']}; a set's maps share one scale).</p>",
        *sections,
        "</body></html>",
    ]
    with open(os.path.join(out, "index.html"), "w", encoding="utf-8") as f:
        f.write("\n".join(page) + "\n")


_ABOUT = ("workdir", "split", "step", "stage")


def _card(out: str, number: int, card: Any) -> str:
    folder = os.path.join(out, "cards", str(number))
    os.makedirs(folder, exist_ok=True)
    heat = explain.scaled(card.maps)
    example = card.example
    figures = []
    for i, path in enumerate(example.image_paths):
        explain.overlay(path, heat[i]).save(os.path.join(folder, f"{i}.png"))
        classes = ["candidate"]
        if i == example.target:
            classes.append("target")
        elif i == card.prediction:
            classes.append("predicted")
        figures.append(
            f'<figure class="{" ".join(classes)}"><img src="cards/{number}/{i}.png" alt="candidate {i}">'
            f"<figcaption>{i}: #{card.ranks[i]} · {card.scores[i]:.3f}</figcaption></figure>"
        )
    kind = "video" if example.is_video else "static"
    title = "hardest" if card.reason == "hardest" else "correct"
    return (
        f'<section class="card {card.reason}"><h3>{title}: target ranked #{card.ranks[example.target]}</h3>'
        f'<p class="description">“{html.escape(example.description)}”</p>'
        f"<p>{html.escape(example.set_name)} ({kind}); target {example.target}, predicted {card.prediction}</p>"
        f'<div class="candidates">{"".join(figures)}</div></section>'
    )


def _pointing(found: Mapping[str, Any] | None) -> str:
    if not found:
        return ""
    return (
        "<h2>Pointing test</h2><p>Share of descriptions whose target heatmap peaks on a patch overlapping a shape "
        f"the description names: <b>{found['hit_rate']:.3f}</b> over {found['descriptions']} descriptions, against "
        f"{found['cell_chance']:.3f} for a random patch and {found['area_share']:.3f}, the share of the image the "
        f"shapes cover ({found['no_shape']} descriptions name no shape in view and are left out).</p>"
        + _distractors(found.get("distractors"))
    )


def _distractors(found: Mapping[str, Any] | None) -> str:
    if not found or not found["pairs"]:
        return ""
    return (
        f"<p>On {found['pairs']} wrong candidates whose shapes lie elsewhere than the target's named ones, the map "
        f"peaks where the description's shapes are on the target in {found['named_place']:.3f} of cases, on the "
        f"candidate's own shapes in {found['own_shapes']:.3f}, elsewhere in {found['elsewhere']:.3f}.</p>"
    )
