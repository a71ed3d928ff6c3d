#!/usr/bin/env bash
# Cloud TPU launcher; see launch/tpu.py (or launch/tpu.sh --help) for the subcommands and options.
exec python3 "$(dirname "$0")/tpu.py" "$@"
