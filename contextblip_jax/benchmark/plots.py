"""PNG plots of a sweep's rows (`sweep.py`): images/s per framework against descriptions per step, or JAX's
images/s and its efficiency against linear scaling over simulated devices.

Imports matplotlib only when a plot is drawn, with the Agg backend: no display is needed.

Imports: its own package (`benchmark`) only.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any


def _series(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(sweep value, images/s) per framework, in sweep order; failed points have no figures."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if "images_per_s" in row:
            series[row["framework"]].append((row["sweep_value"], row["images_per_s"]))
    return dict(series)


def _title(rows: list[dict[str, Any]]) -> str:
    """What was measured and on which host (the device count, which a devices sweep varies, left out)."""
    first = next((row for row in rows if "images_per_s" in row), {})
    keys = ("measure", "stage", "preset", "dtype", "device")
    return re.sub(r"\b\d+x cpu \(cpu\); ", "", ", ".join(str(first[key]) for key in keys if key in first))


def plot_sweep(rows: list[dict[str, Any]], kind: str, path: str) -> None:
    """Writes the plot of a `kind` sweep to `path`; a failed point is marked where the sweep stopped."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    series = _series(rows)
    failures = [row for row in rows if "failure" in row]
    panels = 2 if kind == "devices" else 1
    figure, axes = pyplot.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    speed = axes[0][0]
    for framework, points in series.items():
        xs, ys = zip(*points, strict=True)
        speed.plot(xs, ys, marker="o", label=framework)
    if kind == "devices" and "jax" in series:
        one = dict(series["jax"]).get(1)
        if one:
            xs = [x for x, _ in series["jax"]]
            speed.plot(xs, [one * x for x in xs], linestyle="--", color="grey", label="linear")
        efficiency = axes[0][1]
        marks = [(row["sweep_value"], row["efficiency_vs_linear"]) for row in rows if "efficiency_vs_linear" in row]
        if marks:
            efficiency.plot(*zip(*marks, strict=True), marker="o")
        efficiency.axhline(1.0, linestyle="--", color="grey")
        efficiency.set(xscale="log", xlabel="devices", ylabel="efficiency against linear", ylim=(0, 1.1))
        efficiency.set_xscale("log", base=2)
    for row in failures:
        speed.axvline(row["sweep_value"], color="red", linestyle=":", label=f"stopped at {row['sweep_value']}")
    speed.set_xscale("log", base=2)
    speed.set(xlabel="descriptions per step" if kind == "descriptions" else "devices", ylabel="images/s")
    speed.legend()
    figure.suptitle(_title(rows))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
