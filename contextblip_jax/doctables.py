"""`python -m contextblip_jax.doctables [--check]`: the tables of README.md and docs/*.md, rewritten from the data
files they report, so that no figure on a page is typed by hand.

A table stands between `<!-- table:NAME -->` and `<!-- /table:NAME -->` on its page; `TABLES` says which data file
and which renderer each NAME has. `--check` changes nothing and exits 1 naming every table that differs from
what its data gives (the test suite runs it on the committed pages).

Imports: `cli`, `compile` (the fit table's renderer); a command (it defines flags), so no module imports it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from contextblip_jax import cli
from contextblip_jax.compile import fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(path: str) -> list[dict[str, Any]]:
    with open(os.path.join(ROOT, path)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _seeds(rows: Sequence[dict[str, Any]]) -> str:
    """The main job per seed: validation accuracy at each evaluation, video / static at the end, wall time."""
    steps = sorted({int(step) for row in rows for step in row["acc"]})
    head = f"| seed | valid acc. at {' / '.join(map(str, steps))} steps | video / static at {steps[-1]} | wall |"
    lines = [head, "|---|---|---|---|"]
    for row in rows:
        accs = " / ".join(f"{row['acc'][str(step)]:.3f}" for step in steps)
        lines.append(
            f"| {row['seed']} | {accs} | {row['acc_video']:.3f} / {row['acc_static']:.3f} | {row['wall_s']:.0f} s |"
        )
    final = [row["acc"][str(steps[-1])] for row in rows]
    mean = sum(final) / len(final)
    lines.append(f"| mean (min–max) | **{mean:.3f} ({min(final):.3f}–{max(final):.3f})** at {steps[-1]} steps | | |")
    machines = sorted({f"{row['machine']}, {row['date']}" for row in rows})
    lines += [
        "",
        f"Machine and date: {'; '.join(machines)}. Command: `{rows[0]['command']}`, one seed after another "
        "(`scripts/main_job_seeds.py`); wall is the whole command, the data's generation included in the run that "
        "generated it. Chance is 0.10.",
    ]
    return "\n".join(lines)


def _benchmark(rows: Sequence[dict[str, Any]]) -> str:
    """One benchmark run's rows (`python -m contextblip_jax.benchmark`): step time, throughput, MFU per framework."""
    lines = [
        "| framework | measured | step time, median (min–max) | images/s | TFLOP/s | MFU | compile |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        step = row["step_s"]
        lines.append(
            f"| {row['framework']} | {row['measure']} `{row['stage']}` "
            f"| {step['median']:.3f} s ({step['min']:.3f}–{step['max']:.3f}) "
            f"| {row['images_per_s']:.3f} | {row['tflops_per_s']:.3f} | {row['mfu']:.3f} | {row['compile_s']:.1f} s |"
        )
    first = rows[0]
    ratio = first.get("ratio_vs_torch")
    lines += [
        "",
        f"Preset `{first['preset']}`, {first['descriptions']} "
        f"descriptions × {first['candidates']} candidates, {first['dtype']}, {first['runs']} timed runs, on "
        f"{first['device']}" + (f"; JAX / PyTorch eager: {ratio:.3f}×" if ratio else "") + ".",
    ]
    return "\n".join(lines)


def _passes(rows: Sequence[dict[str, Any]]) -> str:
    """Whole-pass rows (`benchmark --root`): per measured pass and framework, the time a user waits and the work."""
    lines = [
        "| pass | framework | how batched | sets / descriptions | pass time, median (min–max) | descriptions/s "
        "| images encoded per description | GFLOP per description | JAX / other |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seconds = row["pass_s"]
        kind = "grouped by set" if row["group_by_set"] else "per description"
        if row.get("cache_features"):
            kind = f"cached features (built in {row['cache_build_s']:.0f} s)"
        ratios = [
            f"{value:.2f}× {key.removeprefix('ratio_vs_')}" for key, value in row.items() if key.startswith("ratio_vs_")
        ]
        images = row.get("images_encoded_per_description")
        flops = row.get("flops_per_description")
        measured = f"{row['measure'].removesuffix('_pass')} `{row['stage']}`, {row['text_length']} tokens"
        spread = f"{seconds['median']:.1f} s ({seconds['min']:.1f}–{seconds['max']:.1f})"
        if row.get("warmup_passes"):
            spread += f", after {row['warmup_passes']} untimed"
        lines.append(
            f"| {measured} | {row['framework']} | {kind}, {row['batch_size']} per batch "
            f"| {row['sets']} / {row['descriptions']} | {spread} | {row['descriptions_per_s']:.3f} "
            f"| {'' if images is None else f'{images:.2f}'} | {'' if flops is None else f'{flops / 1e9:.0f}'} "
            f"| {', '.join(ratios)} |"
        )
    first = rows[0]
    devices = sorted({row["device"] for row in rows})
    dates = sorted({row["date"] for row in rows if "date" in row})
    lines += [
        "",
        f"Preset `{first['preset']}`, {first['dtype']}, {first['runs']} timed passes per row, on {'; '.join(devices)}"
        + (f", {', '.join(dates)}" if dates else "")
        + ". GFLOP: XLA's count of the programs run (PyTorch's rows: the same step on per-description batches).",
    ]
    return "\n".join(lines)


def _faults(row: dict[str, Any]) -> str:
    outage = row.get("outage_s", 0)
    return f"{row['rate']:.0%} of requests" + (f", then a {outage:.0f} s outage" if outage else "")


def _storage_faults(rows: Sequence[dict[str, Any]]) -> str:
    """`tests/reliability/storage_faults.py`: a gs:// run against a Cloud Storage failing a share of requests."""
    lines = [
        "| faults | requests | failed: 503 / dropped / slow | retried | runs of the command "
        "| completed, equal to a local run | stops (each naming what failed) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        stops = "; ".join(f"`{stop}`" for stop in row["stops"]) or "none"
        lines.append(
            f"| {_faults(row)} | {row['requests']} | {row['503']} / {row['drop']} / {row['slow']} "
            f"| {row['retries']} | {row['attempts']} | {'yes' if row['completed'] and row['equal_to_local'] else 'no'} "
            f"| {stops} |"
        )
    machines = sorted({f"{row['machine']}, {row['date']}" for row in rows})
    lines += [
        "",
        "Faults: the share of requests failed at random, and an outage (every request answered 503) starting when "
        f"the first run has committed its first checkpoint. A {rows[0]['steps']}-step tiny run (checkpoint every 2 "
        "steps, evaluation every 4) with `--workdir=gs://...` "
        f"on gcp-storage-emulator behind tests/gcs_server.py's proxy (slow answers wait {rows[0]['slow_s']:g} s; "
        f"seed {rows[0]['seed']}), rerun until done; its state and {rows[0]['rows_compared']} metrics rows compared "
        f"with an uninterrupted local run. The 503s include the outage's; retried: requests the proxy saw repeat one "
        "it had failed. "
        f"{'; '.join(machines)}.",
    ]
    return "\n".join(lines)


def _pointing(rows: Sequence[dict[str, Any]]) -> str:
    """`scripts/pointing_seeds.py`: the heatmaps' pointing test per model and text layer, over seeds."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["kinds"], row["stage"], row["rule"], row["layer"]), []).append(row)
    lines = [
        "| data (scene kinds) | maps of | rule | text layer | valid acc. | target: hit rate, mean (min–max) "
        "| random patch | area share "
        "| wrong candidates: at the named place / on own shapes / elsewhere |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (kinds, stage, rule, layer), group in groups.items():
        hits = [row["hit_rate"] for row in group]

        def mean(key: str, group: list[dict[str, Any]] = group) -> float:
            return sum(row[key] for row in group) / len(group)

        def share(key: str, group: list[dict[str, Any]] = group) -> str:
            counted = [row["distractors"][key] for row in group if row["distractors"]["pairs"]]
            return f"{sum(counted) / len(counted):.3f}" if counted else "–"

        lines.append(
            f"| {kinds} | {stage} | {rule} | {layer} | {mean('acc'):.3f} "
            f"| **{mean('hit_rate'):.3f}** ({min(hits):.3f}–{max(hits):.3f}) "
            f"| {mean('cell_chance'):.3f} | {mean('area_share'):.3f} "
            f"| {share('named_place')} / {share('own_shapes')} / {share('elsewhere')} |"
        )
    machines = sorted({f"{row['machine']}, {row['date']}" for row in rows})
    seeds = sorted({row["seed"] for row in rows})
    first = rows[0]
    lines += [
        "",
        f"Seeds {', '.join(map(str, seeds))} of the main job (600 steps) on data of the kinds named, means over "
        f"seeds; their validation split (the main job's: {first['descriptions']} descriptions, "
        f"{first['distractors']['pairs']} wrong candidates per seed whose shapes lie on other patches than the "
        "target's; recolour scenes' grey shape is never named, and their wrong candidates show the named shape "
        "where the target does: –). Hit: the patch holding the target map's maximum "
        "overlaps a shape the description names. Random patch: the share of patches overlapping those shapes (the "
        "fair chance level); area share: the share of the image they cover. finetune: the trained 2a model; "
        "zeroshot: its towers scored by the ITM head, which 2a never trains; untrained: the same model at its random "
        "initialisation. Rules: gradcam, attention × positive gradient; gradient, the positive gradient alone. "
        f"Report time: {sum(row['report_s'] for row in rows) / len(rows):.0f} s on average (every "
        "set's heatmaps and the page). Made by `python scripts/pointing_seeds.py --seeds=0,1,2 --layers=0,1 "
        "--rules=gradcam,gradient --zero_shot --untrained` (and `--kinds=K` for other data); each report by "
        f"`{first['command']}` (its stage, layer "
        f"and rule). {'; '.join(machines)}.",
    ]
    return "\n".join(lines)


def _spread(values: Sequence[float]) -> str:
    return f"{sum(values) / len(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def _by_cell(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    cells: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault(row["cell"], []).append(row)
    return cells


def _figure(row: dict[str, Any], measure: str) -> float:
    return row[measure] if measure in ("acc", "acc_video", "acc_static") else row["acc_by_kind"][measure]


def _ablations(rows: Sequence[dict[str, Any]]) -> str:
    """`scripts/ablations.py`: validation accuracy per cell of the grid, mean (min–max) over seeds."""
    kinds = [kind.split(":")[0] for kind in rows[0]["kinds"].split(",")]
    lines = [
        f"| cell | seeds | overall | video | static | {' | '.join(kinds)} |",
        "|---|---|---|---|---|" + "---|" * len(kinds),
    ]
    for cell, group in _by_cell(rows).items():
        figures = [_spread([_figure(row, m) for row in group]) for m in ("acc", "acc_video", "acc_static", *kinds)]
        lines.append(f"| {cell} | {len(group)} | {' | '.join(figures)} |")
    first = rows[0]
    steps = first["steps"]
    machines = sorted({f"{row['machine']}, {row['date']}" for row in rows})
    lines += [
        "",
        f"Validation accuracy at the last step (no checkpoint chosen), mean (min–max) over seeds; "
        f"{first['descriptions']} descriptions of the generated mix `{first['kinds']}` (chance 0.10). Steps: stage 1 "
        f"{steps['pretrain']}, 2a {steps['finetune']}, 2b {steps['context']} (batch 16; the follow-up's 2b: 4× "
        f"as many). Made by `python scripts/ablations.py --seeds=0,1,2` (and `--follow_up`). {'; '.join(machines)}.",
    ]
    return "\n".join(lines)


ABLATION_CLAIMS = (
    ("the inter-context encoder helps on video", "2a → 2b", "2a", "recolour"),
    ("the inter-context encoder helps on video", "2a → 2b", "2a", "acc_video"),
    ("the inter-context encoder, after the whole recipe", "1 → 2a → 2b", "1 → 2a", "recolour"),
    ("the inter-context encoder, 4× the steps (follow-up)", "2a → 2b, 4× the steps (follow-up)", "2a", "recolour"),
    ("the adapter helps fine-grained matching", "2a", "2a, no adapter", "detail"),
    ("the adapter helps fine-grained matching", "2a", "2a, no adapter", "acc"),
    ("stage 1 helps", "1 → 2a", "2a", "acc"),
    ("TMIM helps fine-grained matching", "1 → 2a", "1 no TMIM → 2a", "detail"),
    ("TMIM helps fine-grained matching", "1 → 2a", "1 no TMIM → 2a", "acc"),
)
"""The paper's claims as paired comparisons of the grid: (claim, cell with the part, cell without, measure)."""


def _ablation_claims(rows: Sequence[dict[str, Any]]) -> str:
    """Each claim's cells compared seed by seed (the same seed's runs differ in the part alone)."""
    cells = {cell: {row["seed"]: row for row in group} for cell, group in _by_cell(rows).items()}
    lines = [
        "| claim of the paper | with | without | measure | with − without, per seed | mean | seeds up |",
        "|---|---|---|---|---|---|---|",
    ]
    for claim, with_part, without, measure in ABLATION_CLAIMS:
        seeds = sorted(set(cells[with_part]) & set(cells[without]))
        gains = [_figure(cells[with_part][s], measure) - _figure(cells[without][s], measure) for s in seeds]
        per_seed = " / ".join(f"{g:+.3f}" for g in gains)
        up = sum(g > 0 for g in gains)
        name = {"acc": "overall", "acc_video": "video", "acc_static": "static"}.get(measure, measure)
        mean = sum(gains) / len(gains)
        lines.append(
            f"| {claim} | {with_part} | {without} | {name} | {per_seed} | {mean:+.3f} | {up} of {len(gains)} |"
        )
    return "\n".join(lines)


def _ablation_runs(rows: Sequence[dict[str, Any]]) -> str:
    """`scripts/ablations.py`'s training runs: wall time per stage, for the grid and for the follow-up."""
    groups: dict[tuple[bool, str], list[float]] = {}
    for row in rows:
        groups.setdefault((row["follow_up"], row["stage"]), []).append(row["wall_s"])
    lines = [
        "| part | stage | runs | steps | wall per run, mean (min–max) | wall, all runs |",
        "|---|---|---|---|---|---|",
    ]
    for (follow_up, stage), walls in groups.items():
        steps = sorted({row["steps"] for row in rows if row["stage"] == stage and row["follow_up"] == follow_up})
        lines.append(
            f"| {'follow-up' if follow_up else 'grid'} | {stage} | {len(walls)} | {', '.join(map(str, steps))} "
            f"| {sum(walls) / len(walls):.0f} s ({min(walls):.0f}–{max(walls):.0f}) | {sum(walls) / 60:.1f} min |"
        )
    grid = [row["wall_s"] for row in rows if not row["follow_up"]]
    machines = sorted({f"{row['machine']}, {row['date']}" for row in rows})
    lines += [
        "",
        f"The grid's {len(grid)} training runs: {sum(grid) / 60:.1f} min, each a whole `train` command (the data's "
        f"generation in the first); its scoring adds an `evaluate` command per cell and seed. {'; '.join(machines)}.",
    ]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Table:
    data: str
    render: Callable[[Sequence[dict[str, Any]]], str]


TABLES = {
    "main_job_seeds": Table("docs/main_job/seeds.jsonl", _seeds),
    "benchmarks_cpu_train": Table("docs/benchmarks/train_base_cpu.jsonl", _benchmark),
    "benchmarks_cpu_eval": Table("docs/benchmarks/eval_base_cpu.jsonl", _benchmark),
    "benchmarks_gpu_h200_autotune0": Table("docs/benchmarks/gpu_h200_autotune0.jsonl", _benchmark),
    "benchmarks_cpu_passes": Table("docs/benchmarks/passes_base_cpu.jsonl", _passes),
    "fit": Table("docs/fit/fit.jsonl", fit.markdown),
    "storage_faults": Table("docs/reliability/storage_faults.jsonl", _storage_faults),
    "pointing": Table("docs/report/pointing.jsonl", _pointing),
    "ablations": Table("docs/ablations/cells.jsonl", _ablations),
    "ablation_claims": Table("docs/ablations/cells.jsonl", _ablation_claims),
    "ablation_runs": Table("docs/ablations/runs.jsonl", _ablation_runs),
}
_BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.S)


def pages(root: str = ROOT) -> list[str]:
    return [os.path.join(root, "README.md"), *sorted(glob.glob(os.path.join(root, "docs", "*.md")))]


def render(text: str, page: str) -> str:
    """`text` with every table block filled from its data; an unknown NAME is an error naming the page."""

    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in TABLES:
            raise ValueError(f"{page}: table {name!r} has no data file; known tables: {sorted(TABLES)}")
        table = TABLES[name]
        return f"{match.group(1)}{table.render(_rows(table.data))}\n{match.group(4)}"

    return _BLOCK.sub(fill, text)


def stale(root: str = ROOT) -> list[str]:
    """The pages whose tables differ from what their data gives."""
    found = []
    for page in pages(root):
        with open(page) as f:
            text = f.read()
        if render(text, page) != text:
            found.append(os.path.relpath(page, root))
    return found


def write(root: str = ROOT) -> list[str]:
    """Rewrites every page's tables from their data; returns the pages that changed."""
    changed = stale(root)
    for name in changed:
        page = os.path.join(root, name)
        with open(page) as f:
            text = f.read()
        with open(page, "w") as f:
            f.write(render(text, page))
    return changed


_CHECK = flags.DEFINE_bool("check", False, "Change nothing; exit 1 naming the pages whose tables are stale.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CHECK.value:
        if found := stale():
            sys.exit(f"stale tables in {', '.join(found)}: run python -m contextblip_jax.doctables")
        return
    for page in write():
        print(f"rewrote {page}")


if __name__ == "__main__":
    cli.run(main)
