"""Command line: parse, dispatch, exit codes (0 ok, 1 a run failed, 2 a usage or input error, 75 a server or
database stayed away past the outage limit: run the same command again later)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench import config, process
from bench.errors import UserError
from bench.paths import check_writable
from bench.process import Terminated  # noqa: F401  (a stop's class, as `cli.Terminated` too)
from bench.servers import checks as stores
from bench.servers import retry as outage
from bench.servers.urls import redact, scrub

# A command's stop on SIGTERM, under the names it has had here (tests install and compare them).
_stopping_on_sigterm, _terminated = process.stopping_on_sigterm, process.terminated

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
    from bench import engine, suite

    names = list(args.experiments)
    if args.suite:
        names += config.suite_experiments(args.suite)
    if not names:
        raise UserError("name experiments to run or give --suite NAME (see `bench list`)")
    for value, flag in ((args.seeds, "--seeds"), (args.epochs, "--epochs"), (args.workers, "--workers")):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.ablate and (args.sets or args.epochs is not None):
        flag = "--set" if args.sets else "--epochs"
        raise UserError(
            f"--ablate flips the switches of the profile's recipe; {flag} would change the recipe itself: "
            "put the change in a profile (experiments/profiles/) and run --ablate with --profile NAME"
        )
    seeds = args.seeds or config.profile_seeds(args.profile)
    names = list(dict.fromkeys(names))
    cells = suite.plan(names, profile=args.profile, seeds=seeds, sets=args.sets, epochs=args.epochs, ablate=args.ablate)
    total = len(cells)
    cells = suite.shard(cells, args.shard)
    count = min(args.workers, len(cells))  # more workers than cells would have nothing to do
    from bench.tracking import resolve_uri

    uri = resolve_uri(args.tracking_uri)
    stores.check("tracking store", uri)
    check_writable(args.checkpoint_dir, "--checkpoint-dir")
    if args.dry_run:
        print(suite.dry_run_table(cells))
        which = f", shard {args.shard}: {len(cells)} of {total} cells" if args.shard else ""
        if args.ablate:
            every = ", every shard together" if args.shard else ""
            print(f"\nWhat --ablate trains ({_count(seeds, 'seed')}{every}):")
            print(suite.ablation_table(names, profile=args.profile, seeds=seeds, data_dir=args.data_dir))
            print(
                f"{total} cells (the recipe and each trained variant x {_count(seeds, 'seed')}), profile {args.profile}{which}"
            )
        else:
            print(
                f"{total} cells ({len(set(c.experiment for c in cells))} experiments x {_count(seeds, 'seed')}), profile {args.profile}{which}"
            )
        if args.workers > 1 and cells:
            from bench.suite import workers as run_workers

            on = ", ".join(f"worker {i + 1} on {d}" for i, d in enumerate(run_workers.devices(args.device, count)))
            print(f"{_count(count, 'worker')} would start: {on}")
        return 0
    device = engine.resolve_device(args.device)
    stores.probe("tracking store", uri)
    suite.preflight(cells, args.data_dir)
    from bench.tracking import Tracker, ui_command

    if count > 1:
        from bench.suite import workers as run_workers

        run_workers.devices(
            args.device, count
        )  # a worker's device that is not there stops here, before any worker starts
        suite.create_experiments(cells, Tracker(uri))
        outcomes = run_workers.run(cells, args=args, count=count)
    else:
        outcomes = suite.run_cells(
            cells, tracker=Tracker(uri), device=device, data_dir=args.data_dir, checkpoint_root=args.checkpoint_dir
        )
    print(suite.summary_table(outcomes))
    print(f"\nSee the runs: {ui_command(redact(uri))}")
    failed = [o for o in outcomes if o.status not in ("finished", "skipped")]
    if failed:
        print(
            f"{len(failed)} of {len(outcomes)} cells did not finish: {', '.join(o.cell.name for o in failed)}",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE if any(o.status == suite.UNREACHABLE for o in outcomes) else 1
    return 0


def cmd_tune(args) -> int:
    import os

    from bench import engine, suite, tuning, workers
    from bench.tracking import Tracker, resolve_uri, ui_command
    from bench.tuning import sampling

    for value, flag, least in (
        (args.trials, "--trials", 1),
        (args.epochs, "--epochs", 1),
        (args.heartbeat, "--heartbeat", 1),
        (args.workers, "--workers", 0),
    ):
        if value is not None and value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if args.timeout is not None and not args.timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    base = config.load(args.experiment, profile=args.profile, seed=args.seed, sets=args.sets, epochs=args.epochs)
    space = tuning.search_space(args.experiment, base)
    url = args.storage or os.environ.get("BENCH_OPTUNA_STORAGE") or DEFAULT_OPTUNA
    uri = resolve_uri(args.tracking_uri)
    stores.check("Optuna storage", url)
    stores.check("tracking store", uri)
    check_writable(args.checkpoint_dir, "--checkpoint-dir")
    name = args.study or f"{args.experiment}-{args.profile}"
    stores.probe("Optuna storage", url)
    store = tuning.storage(url, args.heartbeat)
    study = tuning.open_study(
        store,
        name,
        sampler_=sampling.sampler(
            args.sampler, sampling.sampler_seed(args.seed, store, name, alone=not args.worker_of), space
        ),
        pruner_=tuning.pruner(args.pruner, base.train.epochs),
        first_trial=tuning.recipe_values(space, base),
        experiment=args.experiment,
        profile=args.profile,
        base_config_hash=None if args.best else base.config_hash(),
    )
    if args.best:
        return _print_best(study, args, tuning)
    stores.probe("tracking store", uri)
    tracker = Tracker(uri)
    exp_id = tracker.experiment_id(args.experiment, config.about_markdown(args.experiment))
    engine.resolve_device(args.device)  # a device that is not there stops here, before any worker starts
    suite.preflight([suite.Cell(args.profile, base)], args.data_dir)
    if args.worker_of:
        parent = tuning.ParentRun.attach(tracker, exp_id, args.worker_of)
    else:
        parent = tuning.ParentRun(tracker, exp_id, study, space, profile=args.profile, storage_url=url)
        for number in sampling.queue_interrupted(study):  # a process killed before it queued the retry
            print(f"trial {number} was interrupted: queued again with its values", file=sys.stderr)
    count = 1 if args.worker_of else args.workers if args.workers is not None else workers.default_count(args.device)
    done = tuning.finished(study)
    if not args.worker_of:
        print(
            f"study {name} in {redact(url)}: {done} of {args.trials} trials finished; watch it: optuna-dashboard {redact(url)}",
            file=sys.stderr,
        )
    if count == 0:
        print(f"study {name} and its MLflow parent run {parent.run_id} are ready; start workers with the same command")
        return 0
    train_images = len(suite.files_for(base, args.data_dir).train)
    val_size = tuning.tuning_val_size(base, train_images)
    held_out = (
        [f"data.val_size={val_size}"] if val_size else []
    )  # for the trials only: --best's command trains on the recipe's data
    if val_size and not args.worker_of:
        print(
            f"{args.experiment} trains on all {train_images} training images (data.val_size = 0): tuning holds out {val_size} "
            f"of them to validate on (each trial's data.val_size = {val_size})",
            file=sys.stderr,
        )
    stopped = None
    if count > 1:
        # The URLs go by environment, not argv: `ps` would show a password to every user.
        env = {**workers.thread_env(count), "BENCH_OPTUNA_STORAGE": url, "MLFLOW_TRACKING_URI": uri}
        codes = workers.run_all([_worker_args(args, name, parent.run_id, i) for i in range(count)], env)
        failed = [c for c in codes if c != 0]
        if (
            EXIT_UNAVAILABLE in failed
        ):  # a store stayed away: the parent run is ended by the command that completes the study
            print(
                f"{failed.count(EXIT_UNAVAILABLE)} of {count} workers stopped: a server stayed away past the outage limit; "
                "run the same command again once it answers",
                file=sys.stderr,
            )
            return EXIT_UNAVAILABLE
        if failed:
            stopped = f"{len(failed)} of {count} workers exited with an error ({', '.join(map(str, failed))})"
            print(stopped, file=sys.stderr)
    elif done < args.trials:
        ctx = tuning.TrialContext(
            experiment=args.experiment,
            profile=args.profile,
            seed=args.seed,
            sets=[*args.sets, *held_out],
            epochs=args.epochs,
            space=space,
            device=engine.resolve_device(args.device),
            files=suite.files_for(base, args.data_dir),
            checkpoint_root=args.checkpoint_dir / "tune",
            tracker=tracker,
            experiment_id=exp_id,
            parent_run_id=parent.run_id,
        )
        stopped = tuning.optimize(
            study, ctx, trials=args.trials, timeout=args.timeout, parent=parent, poll_s=min(5.0, args.heartbeat)
        )
        if stopped:
            print(f"study {name}: {stopped}", file=sys.stderr)
    if args.worker_of:
        return 1 if stopped else 0  # the process that started the workers reports and closes the parent run
    parent.end(study)
    print(f"{tuning.finished(study)} finished trials in study {name}")
    where = (
        parent.url
        if parent.url.startswith("http")
        else f"{ui_command(redact(uri))}, then open {parent.url} at the address it serves"
    )
    print(f"See the study's runs: {where}")
    _print_best(study, args, tuning)
    return 0 if tuning.finished(study) >= args.trials or (args.timeout and not stopped) else 1


def _worker_args(args, study: str, parent_run_id: str, index: int) -> list[str]:
    """The `bench tune` arguments of worker `index`: this command's, with its own device (the
    storage and tracking URLs go in the environment)."""
    from bench import workers

    argv = [
        "tune",
        args.experiment,
        "--profile",
        args.profile,
        "--trials",
        str(args.trials),
        "--study",
        study,
        "--pruner",
        args.pruner,
        "--sampler",
        args.sampler,
        "--seed",
        str(args.seed),
        "--heartbeat",
        str(args.heartbeat),
        "--device",
        workers.device_for(args.device, index),
        "--checkpoint-dir",
        str(args.checkpoint_dir),
        "--worker-of",
        parent_run_id,
    ] + (["--debug"] if args.debug else [])
    for flag, value in (("--timeout", args.timeout), ("--epochs", args.epochs), ("--data-dir", args.data_dir)):
        if value is not None:
            argv += [flag, str(value)]
    for s in args.sets:
        argv += ["--set", s]
    return argv


def _print_best(study, args, tuning) -> int:
    try:
        best = study.best_trial
    except ValueError:
        print(f"study {study.study_name} has no complete trial yet")
        return 0
    print(f"best trial {best.number}: val_acc {best.value:.4f}")
    for k, v in sorted(best.params.items()):
        print(f"  {k} = {v}")
    print(tuning.best_command(args.experiment, args.profile, best.params, fixed=args.sets, epochs=args.epochs))
    return 0


def cmd_report(args) -> int:
    from bench.report import command

    return command.main(args, default_storage=DEFAULT_OPTUNA)


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
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt as exc:
        name = getattr(exc, "signal_name", "SIGINT")
        print(f"bench: interrupted ({name}); the same command resumes where it stopped", file=sys.stderr)
        return process.exit_code(exc)
