#!/usr/bin/env bash
# Regenerates reports/smoke/: the report of a 2-seed smoke suite with every experiment's ablations
# and a 4-trial smoke study, trained from fresh stores in a temporary directory.
# Run from anywhere: scripts/example_report.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
store="sqlite:///$work/mlflow.db"
study="sqlite:///$work/optuna.db"
python -m bench run --suite all --ablate --profile smoke --seeds 2 --tracking-uri "$store" --checkpoint-dir "$work/checkpoints"
python -m bench tune resnetb-cifar10 --profile smoke --trials 4 --tracking-uri "$store" --storage "$study" --checkpoint-dir "$work/checkpoints"
rm -rf reports/smoke
python -m bench report --suite all --profile smoke --tracking-uri "$store" --storage "$study" --out reports/smoke
