"""Command line: parse, dispatch, exit codes (0 ok, 1 a run failed, 2 a usage or input error, 75 a server or
database stayed away past the outage limit: run the same command again later)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench import config, process
from bench.errors import UserError, scrub
from bench.servers import retry as outage

DEFAULT_OPTUNA = "sqlite:///optuna.db"
OUTAGE_HELP = (
    f"seconds to wait for a tracking server or database that stopped answering before stopping with what is done kept "
    f"(default ${outage.LIMIT_ENV} or {outage.DEFAULT_LIMIT_S:g})"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="Re-run, compare and tune four published CIFAR ResNet runs.")
    debug = "show tracebacks, bench's debug log and the libraries' output (MLflow's run links, MLflow's and Optuna's logs, warnings)"
    p.add_argument("--debug", action="store_true", help=debug)
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="experiments, suites, profiles and models")
    _run_parser(sub)
    _tune_parser(sub)
    _report_parser(sub)
    _register_parser(sub)
    _perf_parser(sub)
    for command in sub.choices.values():  # --debug also after the command's name, where it is usually typed
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    return p


def _run_parser(sub) -> None:
    r = sub.add_parser("run", help="train experiments or a suite, several seeds, tracked in MLflow")
    r.add_argument("experiments", nargs="*", metavar="EXPERIMENT", help="experiment names (see `bench list`)")
    r.add_argument("--suite", help="a suite of experiments, e.g. all")
    r.add_argument("--profile", default="paper", help="paper (as reported, default) or smoke (embedded data, minutes)")
    r.add_argument("--seeds", type=int, help="seeds per experiment (default: the profile's)")
    r.add_argument("--epochs", type=int, help="override train.epochs")
    r.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. optim.lr=0.05 (repeatable)",
    )
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:I or mps (default auto)")
    r.add_argument("--data-dir", type=Path, help="CIFAR directory in the official layout (default ./data)")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    r.add_argument("--outage-limit", type=float, metavar="SECONDS", help=OUTAGE_HELP)
    r.add_argument(
        "--checkpoint-dir", type=Path, default=Path("checkpoints"), help="local checkpoints (default ./checkpoints)"
    )
    r.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="K",
        help="K processes on this machine train the cells (of the shard), "
        "each on its device (GPUs in turn, several on one GPU allowed) with its share of the CPU threads (default 1)",
    )
    r.add_argument(
        "--shard",
        metavar="I/N",
        help="run only shard I of N (1 <= I <= N): N processes or machines with 1/N .. N/N run every cell once",
    )
    r.add_argument(
        "--ablate",
        action="store_true",
        help="also each experiment's ablations: every quirk switch of the recipe flipped "
        "alone, and all standard values together (switches that change only the measurement are measured on every run's weights)",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cells and their recipes (with --ablate, each variant's cost), train nothing",
    )


def _tune_parser(sub) -> None:
    t = sub.add_parser("tune", help="search lr, weight decay and batch size with Optuna, pruned, tracked in MLflow")
    t.add_argument("experiment", metavar="EXPERIMENT", help="the experiment to tune (see `bench list`)")
    t.add_argument("--profile", default="paper", help="paper (default) or smoke")
    t.add_argument(
        "--trials",
        type=int,
        default=20,
        help="run until the study has N finished (complete or pruned) trials (default 20)",
    )
    t.add_argument("--timeout", type=float, help="stop starting trials after S seconds")
    t.add_argument("--storage", help=f"Optuna storage URL (default $BENCH_OPTUNA_STORAGE or {DEFAULT_OPTUNA})")
    t.add_argument("--study", help="study name (default <experiment>-<profile>)")
    t.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median", help="default median")
    t.add_argument("--sampler", choices=["tpe", "random"], default="tpe", help="default tpe")
    t.add_argument("--seed", type=int, default=0, help="seed of the sampler and of every trial's training (default 0)")
    t.add_argument("--epochs", type=int, help="override train.epochs for every trial")
    t.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fixed override for every trial (repeatable)",
    )
    t.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        help="seconds between trial heartbeats; a trial silent for twice that is failed and retried (default 60)",
    )
    t.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the study (default: one per visible GPU, else 1); "
        "0 only creates the study and its MLflow parent run, for workers started elsewhere",
    )
    t.add_argument("--worker-of", help=argparse.SUPPRESS)  # the parent run's id: set in worker processes
    t.add_argument(
        "--best", action="store_true", help="print the best trial and the `bench run` command that trains it, then exit"
    )
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:I or mps (default auto)")
    t.add_argument("--data-dir", type=Path, help="CIFAR directory in the official layout (default ./data)")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    t.add_argument("--outage-limit", type=float, metavar="SECONDS", help=OUTAGE_HELP)
    t.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=Path("checkpoints"),
        help="scratch checkpoints of running trials (default ./checkpoints)",
    )


def _report_parser(sub) -> None:
    rep = sub.add_parser("report", help="markdown and figures: the suite's runs beside the reported ones")
    rep.add_argument("--suite", default="all", help="the suite to report on (default all)")
    rep.add_argument(
        "--profile",
        help="the profile whose runs to report (default: paper if it has finished runs, else the profile with the most)",
    )
    rep.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    rep.add_argument("--out", type=Path, help="output directory (default reports/<suite>/)")
    rep.add_argument(
        "--storage",
        help="Optuna storage whose studies of the suite's experiments make the tuning section "
        f"(default $BENCH_OPTUNA_STORAGE, else {DEFAULT_OPTUNA} when ./optuna.db exists; none: no tuning section)",
    )


def _register_parser(sub) -> None:
    reg = sub.add_parser(
        "register", help="register the best seed's trained model of a config in MLflow's Model Registry"
    )
    reg.add_argument(
        "experiment", metavar="EXPERIMENT", help="the experiment whose recipe's runs to choose from (see `bench list`)"
    )
    reg.add_argument(
        "--profile", default="paper", help="the profile of the runs, and the alias it gets (default paper)"
    )
    reg.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the config's overrides, as `bench run` was given them (repeatable)",
    )
    reg.add_argument("--epochs", type=int, help="train.epochs, as `bench run` was given it")
    reg.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


def _perf_parser(sub) -> None:
    pf = sub.add_parser("perf", help="throughput of the data pipeline, the engine and tracking against plain PyTorch")
    pf.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help="a model to measure (repeatable; default all four)",
    )
    pf.add_argument(
        "--quick", action="store_true", help="fewer images and epochs, one measurement per side: a first look"
    )
    pf.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON")
    pf.add_argument(
        "--profile",
        default="smoke",
        help="the profile whose batch sizes, image sizes and checkpoint interval to use (default smoke)",
    )
    pf.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:I or mps (default auto)")
    pf.add_argument(
        "--workers",
        type=int,
        nargs="+",
        metavar="K",
        help="instead: the throughput of K trainers at once on the device, "
        "for each K, and the K that trains one seed of the paper suite fastest (an estimate)",
    )


def cmd_list(args) -> int:
    print(config.listing())
    return 0


def cmd_run(args) -> int:
    from bench import suite

    return suite.command.run(args)


def cmd_tune(args) -> int:
    from bench import tuning

    return tuning.command.tune(args, default_storage=DEFAULT_OPTUNA)


def cmd_report(args) -> int:
    from bench.report import command

    return command.main(args, default_storage=DEFAULT_OPTUNA)


def cmd_register(args) -> int:
    from bench.tracking import command

    return command.register(args)


def cmd_perf(args) -> int:
    from bench import perf

    return perf.main(args)


COMMANDS = {
    "list": cmd_list,
    "run": cmd_run,
    "tune": cmd_tune,
    "report": cmd_report,
    "register": cmd_register,
    "perf": cmd_perf,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with process.setup(args) as urls:
        return _dispatch(args, urls)


def _dispatch(args, urls: list[str]) -> int:
    try:
        for flag in ("tracking_uri", "storage", "study"):
            if getattr(args, flag, None) is not None and not getattr(args, flag).strip():
                raise UserError(f"--{flag.replace('_', '-')} must not be empty")
        limit = getattr(args, "outage_limit", None)
        if limit is not None:
            if not 0 <= limit < float("inf"):
                raise UserError(f"--outage-limit must be a number of seconds >= 0, got {limit:g}")
            os.environ[outage.LIMIT_ENV] = f"{limit:g}"  # the workers this command starts read it too
        outage.limit_s()  # a malformed $BENCH_OUTAGE_LIMIT_S is named before anything runs
        return COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        # One line, whatever a wrapped message held.
        line = " ".join(str(exc).split())
        print(f"bench: error: {scrub(line, urls)}", file=sys.stderr)
        return 2
    except outage.Unavailable as exc:
        if args.debug:
            raise
        print(
            f"bench: stopped: {scrub(str(exc), urls)}; what was done is kept: run the same command again once it answers",
            file=sys.stderr,
        )
        return outage.EXIT_CODE
    except KeyboardInterrupt as exc:
        name = getattr(exc, "signal_name", "SIGINT")
        print(f"bench: interrupted ({name}); the same command resumes where it stopped", file=sys.stderr)
        return process.exit_code(exc)
