"""Epochs saved by a pruner: the same study (experiment, profile, sampler, seed, trial count) run once
with each pruner, each in its own Optuna and MLflow store.

    python scripts/compare_pruners.py hw4-resnet-cifar100 --profile smoke --trials 16
    python scripts/compare_pruners.py resnetb-cifar10 --pruners median hyperband none --sampler random

Prints one line per pruner (epochs trained, trials complete/pruned, best validation accuracy, wall
time) and the epochs saved against the last pruner named (`none` by default); --json writes the
same figures. With `--sampler random` every pruner sees the same sequence of trial values, so the
comparison isolates the pruner; with `tpe` (the default of `bench tune`) the sampler also reacts
to what was pruned.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna


def run_study(args, pruner: str, workdir: Path) -> dict:
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    command = [
        sys.executable,
        "-m",
        "bench",
        "tune",
        args.experiment,
        "--profile",
        args.profile,
        "--trials",
        str(args.trials),
        "--pruner",
        pruner,
        "--sampler",
        args.sampler,
        "--seed",
        str(args.seed),
        "--storage",
        storage,
        "--tracking-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--checkpoint-dir",
        str(workdir / "checkpoints"),
    ]
    if args.data_dir:
        command += ["--data-dir", str(args.data_dir)]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name=f"{args.experiment}-{args.profile}", storage=storage)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    return {
        "pruner": pruner,
        "epochs": sum(len(t.intermediate_values) for t in trials),
        "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        "best_val_acc": study.best_value,
        "best_trial": study.best_trial.number,
        "seconds": round(seconds, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment")
    p.add_argument("--profile", default="smoke")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--pruners", nargs="+", default=["median", "none"], help="the last one is the baseline")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = []
    for pruner in args.pruners:
        with tempfile.TemporaryDirectory(prefix=f"pruner-{pruner}-") as tmp:
            row = run_study(args, pruner, Path(tmp))
        rows.append(row)
        print(
            f"{pruner:10s} epochs {row['epochs']:4d}  complete {row['complete']:3d}  pruned {row['pruned']:3d}  "
            f"best val_acc {row['best_val_acc']:.4f} (trial {row['best_trial']})  {row['seconds']:.0f} s",
            flush=True,
        )
    base = rows[-1]
    for row in rows[:-1]:
        row["epochs_saved"] = 1 - row["epochs"] / base["epochs"]
        row["val_acc_difference"] = row["best_val_acc"] - base["best_val_acc"]
        print(
            f"{row['pruner']} against {base['pruner']}: {100 * row['epochs_saved']:.1f} % fewer epochs, "
            f"best val_acc {100 * row['val_acc_difference']:+.1f} points"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "experiment": args.experiment,
                    "profile": args.profile,
                    "trials": args.trials,
                    "sampler": args.sampler,
                    "seed": args.seed,
                    "studies": rows,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
