"""Command line: parse, dispatch, exit codes (0 ok, 1 a run failed, 2 a usage or input error, 75 a server or
database stayed away past the outage limit: run the same command again later)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from bench import config, console, hostmem
from bench.errors import UserError, reason, unusable
from bench.paths import check_writable
from bench.servers import checks as stores
from bench.servers import retry as outage
from bench.servers.urls import password, redact, scrub

DEFAULT_OPTUNA = "sqlite:///optuna.db"
EXIT_UNAVAILABLE = 75  # EX_TEMPFAIL: a scheduler may run the job again
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
    for command in sub.choices.values():  # --debug also after the command's name, where it is usually typed
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    return p


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def cmd_list(args) -> int:
    from bench.models import list_models

    print("experiments:")
    for name in config.list_experiments():
        print(f"  {name:30s} {config.read_experiment(name).get('title', '')}")
    print("suites:")
    for name, exps in sorted(config.read_suites().items()):
        print(f"  {name:30s} {', '.join(exps)}")
    print("profiles:")
    for name in config.list_profiles():
        prof = config.read_profile(name)
        print(f"  {name:30s} {prof.get('description', '')} ({_count(prof.get('seeds', 1), 'seed')})")
    print("models:")
    for name in list_models():
        print(f"  {name}")
    return 0


def cmd_run(args) -> int:
    from bench import suite

    return suite.command.run(args, exit_unavailable=EXIT_UNAVAILABLE, plural=_count)


def cmd_tune(args) -> int:
    from bench import tuning

    return tuning.command.tune(args, default_storage=DEFAULT_OPTUNA, exit_unavailable=EXIT_UNAVAILABLE)


def cmd_report(args) -> int:
    from bench import report, results
    from bench.tracking import resolve_uri

    names = config.suite_experiments(args.suite)
    if args.profile and args.profile not in config.list_profiles():
        raise UserError(f"unknown profile {args.profile!r}; known: {', '.join(config.list_profiles())}")
    uri = resolve_uri(args.tracking_uri)
    stores.check("tracking store", uri)
    out = args.out or Path("reports") / args.suite
    check_writable(out, "--out")
    studies = _studies(args.storage, names)
    stores.probe("tracking store", uri)
    found = results.load(uri, names)
    if found.runs.empty:
        raise UserError(
            f"no runs of suite {args.suite!r} in {redact(uri)}; train them first: bench run --suite {args.suite}"
        )
    summary = report.summarize(found, names, suite=args.suite, profile=args.profile)
    try:
        path = report.write(summary, out, studies)
    except OSError as exc:
        raise UserError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    for row in summary.rows:
        name = row.experiment if row.is_recipe else f"{row.experiment}, {row.label}"
        print(
            f"  {name:30s} {_count(row.final.n, 'seed')}  {row.verdict}"
            + (f" ({row.why_not_comparable})" if row.why_not_comparable else "")
        )
    if studies is not None and studies.handles:
        print(f"  tuning: {', '.join(sorted(studies.handles))}")
    print(f"Report: {path}")
    return 0


def _studies(storage: str | None, experiments: list[str]):
    """The tuning studies for the report, or None when there is no storage to read."""
    import os

    from bench import results

    url = storage or os.environ.get("BENCH_OPTUNA_STORAGE")
    if url is None and Path("optuna.db").is_file():
        url = DEFAULT_OPTUNA
    if url is None or url == "none":
        return None
    stores.check("Optuna storage", url)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise UserError(
            f"no Optuna storage at {redact(url)}: pass --storage with the URL `bench tune` used, or --storage none"
        )
    stores.probe("Optuna storage", url)
    try:
        return results.load_studies(url, experiments)
    except Exception as exc:  # SQLAlchemy and optuna raise many types for a bad or unreachable URL
        hint = (
            " (not an Optuna database: pass the --storage that `bench tune` used)"
            if "no such table" in reason(exc)
            else ""
        )
        raise unusable("Optuna storage", url, exc, hint) from None


def cmd_register(args) -> int:
    from bench.tracking import Tracker, resolve_uri
    from bench.tracking import model as logged_model

    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    uri = resolve_uri(args.tracking_uri)
    stores.check("tracking store", uri)
    stores.probe("tracking store", uri)
    model_uri, run_name, version = logged_model.register(
        Tracker(uri).client, args.experiment, args.profile, args.sets, args.epochs
    )
    print(
        f"Registered the model of {run_name} as {args.experiment} version {version}, alias {args.profile}: {model_uri}"
    )
    print(
        f"Load it: MLFLOW_TRACKING_URI={redact(uri)} python -c \"import mlflow; model = mlflow.pytorch.load_model('{model_uri}')\""
    )
    return 0


def cmd_perf(args) -> int:
    import json

    from bench import engine, perf
    from bench.models import list_models
    from bench.perf import workers as perf_workers

    if args.workers is not None and min(args.workers) < 1:
        raise UserError(f"--workers must be at least 1, got {min(args.workers)}")
    models = args.models or list_models()
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        raise UserError(f"--model {unknown[0]}: no such model; choose from {', '.join(list_models())}")
    config.read_profile(args.profile)
    if args.json is not None:
        _check_writable(args.json)
    device = engine.resolve_device(args.device)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.workers is not None:
        results = perf_workers.run(
            models, sorted(set(args.workers)), profile=args.profile, device=device, quick=args.quick, say=say
        )
        print(perf_workers.table(results))
    else:
        results = perf.run(models, profile=args.profile, device=device, quick=args.quick, say=say)
        print(perf.table(results))
        print(f"\nWhere a training step's time goes:\n{perf.breakdown_table(results)}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0


def _check_writable(path: Path) -> None:
    """Fail before hours of measuring, not after: the file's directory must exist and take files."""
    folder = path.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"--json {path}: {folder} is not a writable directory")


COMMANDS = {
    "list": cmd_list,
    "run": cmd_run,
    "tune": cmd_tune,
    "report": cmd_report,
    "register": cmd_register,
    "perf": cmd_perf,
}


_shown_urls: list[str] = []  # the store URLs of the running command, whose passwords logs must not show


def _hiding_passwords(make_record):
    """A log record factory that replaces those passwords in every record, tracebacks included,
    whichever library logs it (a driver's or MLflow's message may quote a URL)."""

    def make(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if _shown_urls:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            clean = scrub(text, _shown_urls)
            if clean != text:
                record.msg, record.args, record.exc_info, record.exc_text = clean, None, None, None
        return record

    make.hides_passwords = True
    return make


def _guard_passwords(args) -> list[str]:
    """Registers the store URLs this command may show; returns them."""
    urls = [
        getattr(args, "tracking_uri", None),
        getattr(args, "storage", None),
        os.environ.get("MLFLOW_TRACKING_URI"),
        os.environ.get("BENCH_OPTUNA_STORAGE"),
    ]
    _shown_urls[:] = [u for u in urls if u]
    if not getattr(logging.getLogRecordFactory(), "hides_passwords", False):
        logging.setLogRecordFactory(_hiding_passwords(logging.getLogRecordFactory()))
    return list(_shown_urls)


class Terminated(KeyboardInterrupt):
    """SIGTERM, as SLURM and Kubernetes send it some time before they kill: the work in progress
    stops as it does on Ctrl-C (the last finished epoch kept, metrics flushed, the run KILLED)."""

    signal_name = "SIGTERM"


def _terminated(signum, frame) -> None:
    # One clean stop: a second SIGTERM while it runs does not cut it short (SIGKILL still does).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def _stopping_on_sigterm():
    """SIGTERM raises Terminated while the command runs (in the main thread only, where Python
    delivers signals); the handler before it comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with process(args) as urls:
        return _dispatch(args, urls)


@contextlib.contextmanager
def process(args):
    """A bench process's setup for the command `args`, the worker processes of `bench run --workers`
    included: the log, passwords hidden, memory, SIGTERM, the console. Yields the store URLs to hide."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    urls = _guard_passwords(args)
    hostmem.keep_freed_memory()  # before any work: training re-uses its memory every step
    with _stopping_on_sigterm(), console.terminal(args.debug, secret=any(password(u) for u in urls)):
        yield urls


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
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt as exc:
        name = getattr(exc, "signal_name", "SIGINT")
        print(f"bench: interrupted ({name}); the same command resumes where it stopped", file=sys.stderr)
        return 143 if name == "SIGTERM" else 130
