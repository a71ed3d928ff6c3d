"""`python -m contextblip_jax.fit`: the largest global batch whose train step fits each target, for a list of
models, stages and targets, appended to a JSON lines file and printed as a table (`compile/fit.py`).

    python -m contextblip_jax.fit --targets=v5e-8,h100x8 --variants=B/16,L/16 --stages=pretrain,finetune,context \
        --out=fit.jsonl --config.scan_layers=True

Imports: `cli`, `compile`; a command (it defines flags), so no module imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from contextblip_jax import cli
from contextblip_jax.compile import aot, fit
from contextblip_jax.compile.fit import DEFAULT_MESH

_TARGETS = flags.DEFINE_list("targets", ["v5e-8"], "Compile targets, as --compile_only names them.")
_VARIANTS = flags.DEFINE_list("variants", ["B/16"], "Model variants (models/variants.py).")
_STAGES = flags.DEFINE_list("stages", ["finetune"], "Stages: pretrain, finetune, context.")
_OUT = flags.DEFINE_string(
    "out", "fit.jsonl", "JSON lines file the cells are appended to; cells already in it are not compiled again."
)
_WORKDIR = flags.DEFINE_string("workdir", "fit_work", "Where each compile's report is written.")
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 6, "Compiles per cell in the batch search.")
_START_BATCH = flags.DEFINE_integer(
    "start_batch",
    None,
    "Global batch each cell's search starts from, instead of the paper's (1024 for stage 1, 36 after), e.g. to "
    "give each chip of a pod more than one description (docs/limits.md).",
)
_CONFIG = config_flags.DEFINE_config_dict(
    "config",
    ml_collections.ConfigDict(
        {
            "scan_layers": False,
            "remat": (),
            "remat_policy": "full",
            "dtype": "bfloat16",
            "mesh": DEFAULT_MESH,
            "protocol": "authors",
        }
    ),
    "Keys set on every cell's run config (e.g. --config.scan_layers=True, --config.mesh='(-1,16,1)'); "
    "--config.protocol=improved builds each cell from that protocol (stages 2a and 2b grouped by set).",
)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    aot.use_cpu_host()
    rows = fit.sweep(
        _VARIANTS.value,
        _STAGES.value,
        _TARGETS.value,
        dict(_CONFIG.value),
        _OUT.value,
        _WORKDIR.value,
        _MAX_COMPILES.value,
        _START_BATCH.value,
        lambda row: print(fit.markdown([row]).splitlines()[-1], flush=True),
    )
    print(fit.markdown(rows))


def run() -> None:
    """`contextblip-fit`: the same as `python -m contextblip_jax.fit`."""
    cli.run(main)


if __name__ == "__main__":
    run()
