"""`bench tune`: open the study and its MLflow parent run, run its trials here or in K worker
processes, and report the best trial with the `bench run` command that trains its values."""

from __future__ import annotations

import os
import sys

import optuna

from bench import config, job, suite, tracking, workers
from bench.errors import UserError, redact
from bench.paths import check_writable
from bench.servers import checks as stores
from bench.servers import retry as outage
from bench.tuning import sampling
from bench.tuning.loop import optimize
from bench.tuning.space import recipe_values, search_space, tuning_val_size
from bench.tuning.study import ParentRun, best_command, finished, open_study, pruner, storage
from bench.tuning.trial import TrialContext


def tune(args, *, default_storage: str) -> int:
    """The command `args`; its exit code (outage.EXIT_CODE when a worker met a store that stayed
    away past the outage limit). `default_storage`: the Optuna storage without --storage or
    $BENCH_OPTUNA_STORAGE."""
    _check_numbers(args)
    base = config.load(args.experiment, profile=args.profile, seed=args.seed, sets=args.sets, epochs=args.epochs)
    space = search_space(args.experiment, base)
    url = args.storage or os.environ.get("BENCH_OPTUNA_STORAGE") or default_storage
    uri = tracking.resolve_uri(args.tracking_uri)
    stores.check("Optuna storage", url)
    stores.check("tracking store", uri)
    check_writable(args.checkpoint_dir, "--checkpoint-dir")
    name = args.study or f"{args.experiment}-{args.profile}"
    study = _open(args, name, url, base, space)
    if args.best:
        return print_best(study, args)
    tracking.probe.tracking_store(uri)
    tracker = tracking.Tracker(uri)
    exp_id = tracker.experiment_id(args.experiment, config.about_markdown(args.experiment))
    job.resolve_device(args.device)  # a device that is not there stops here, before any worker starts
    suite.preflight([suite.Cell(args.profile, base)], args.data_dir)
    parent = _parent(args, tracker, exp_id, study, space, url)
    count = 1 if args.worker_of else args.workers if args.workers is not None else workers.default_count(args.device)
    done = finished(study)
    if not args.worker_of:
        print(
            f"study {name} in {redact(url)}: {done} of {args.trials} trials finished; watch it: optuna-dashboard {redact(url)}",
            file=sys.stderr,
        )
    if count == 0:
        print(f"study {name} and its MLflow parent run {parent.run_id} are ready; start workers with the same command")
        return 0
    held_out = _held_out(args, base)
    stopped = None
    if count > 1:
        # The URLs go by environment, not argv: `ps` would show a password to every user.
        env = {**workers.thread_env(count), "BENCH_OPTUNA_STORAGE": url, "MLFLOW_TRACKING_URI": uri}
        codes = workers.run_all([worker_args(args, name, parent.run_id, i) for i in range(count)], env)
        if outage.EXIT_CODE in codes:
            return _away(codes, count)
        stopped = _failed_workers(codes, count)
    elif done < args.trials:
        ctx = _context(args, base, space, held_out, tracker, exp_id, parent)
        stopped = optimize(
            study, ctx, trials=args.trials, timeout=args.timeout, parent=parent, poll_s=min(5.0, args.heartbeat)
        )
        if stopped:
            print(f"study {name}: {stopped}", file=sys.stderr)
    if args.worker_of:
        return 1 if stopped else 0  # the process that started the workers reports and closes the parent run
    return _finish(study, args, parent, uri, stopped)


def _check_numbers(args) -> None:
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


def _open(args, name: str, url: str, base: config.RunConfig, space: list) -> optuna.Study:
    """The study, created with the recipe as its first trial or loaded to go on."""
    stores.probe("Optuna storage", url)
    store = storage(url, args.heartbeat)
    return open_study(
        store,
        name,
        sampler_=sampling.sampler(
            args.sampler, sampling.sampler_seed(args.seed, store, name, alone=not args.worker_of), space
        ),
        pruner_=pruner(args.pruner, base.train.epochs),
        first_trial=recipe_values(space, base),
        experiment=args.experiment,
        profile=args.profile,
        base_config_hash=None if args.best else base.config_hash(),
    )


def _parent(args, tracker, exp_id: str, study: optuna.Study, space: list, url: str) -> ParentRun:
    """The study's MLflow parent run: made (or found) here, or the one the command that started
    this worker made."""
    if args.worker_of:
        return ParentRun.attach(tracker, exp_id, args.worker_of)
    parent = ParentRun(tracker, exp_id, study, space, profile=args.profile, storage_url=url)
    for number in sampling.queue_interrupted(study):  # a process killed before it queued the retry
        print(f"trial {number} was interrupted: queued again with its values", file=sys.stderr)
    return parent


def _context(
    args, base: config.RunConfig, space: list, held_out: list[str], tracker, exp_id: str, parent: ParentRun
) -> TrialContext:
    """What every trial of this process shares."""
    return TrialContext(
        experiment=args.experiment,
        profile=args.profile,
        seed=args.seed,
        sets=[*args.sets, *held_out],
        epochs=args.epochs,
        space=space,
        device=job.resolve_device(args.device),
        files=suite.files_for(base, args.data_dir),
        checkpoint_root=args.checkpoint_dir / "tune",
        tracker=tracker,
        experiment_id=exp_id,
        parent_run_id=parent.run_id,
    )


def _held_out(args, base: config.RunConfig) -> list[str]:
    """The --set that holds out a validation split for the trials, where the recipe has none."""
    train_images = len(suite.files_for(base, args.data_dir).train)
    val_size = tuning_val_size(base, train_images)
    held_out = (
        [f"data.val_size={val_size}"] if val_size else []
    )  # for the trials only: --best's command trains on the recipe's data
    if val_size and not args.worker_of:
        print(
            f"{args.experiment} trains on all {train_images} training images (data.val_size = 0): tuning holds out {val_size} "
            f"of them to validate on (each trial's data.val_size = {val_size})",
            file=sys.stderr,
        )
    return held_out


def _away(codes: list[int], count: int) -> int:
    # A store stayed away: the parent run is ended by the command that completes the study.
    print(
        f"{codes.count(outage.EXIT_CODE)} of {count} workers stopped: a server stayed away past the outage limit; "
        "run the same command again once it answers",
        file=sys.stderr,
    )
    return outage.EXIT_CODE


def _failed_workers(codes: list[int], count: int) -> str | None:
    """Why the study stopped short, when workers exited with an error."""
    failed = [c for c in codes if c != 0]
    if not failed:
        return None
    stopped = f"{len(failed)} of {count} workers exited with an error ({', '.join(map(str, failed))})"
    print(stopped, file=sys.stderr)
    return stopped


def _finish(study: optuna.Study, args, parent: ParentRun, uri: str, stopped: str | None) -> int:
    """The parent run ended, where to see the study's runs, the best trial; the exit code."""
    parent.end(study)
    print(f"{finished(study)} finished trials in study {study.study_name}")
    where = (
        parent.url
        if parent.url.startswith("http")
        else f"{tracking.ui_command(redact(uri))}, then open {parent.url} at the address it serves"
    )
    print(f"See the study's runs: {where}")
    print_best(study, args)
    return 0 if finished(study) >= args.trials or (args.timeout and not stopped) else 1


def worker_args(args, study: str, parent_run_id: str, index: int) -> list[str]:
    """The `bench tune` arguments of worker `index`: this command's, with its own device (the
    storage and tracking URLs go in the environment)."""
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


def print_best(study: optuna.Study, args) -> int:
    try:
        best = study.best_trial
    except ValueError:
        print(f"study {study.study_name} has no complete trial yet")
        return 0
    print(f"best trial {best.number}: val_acc {best.value:.4f}")
    for k, v in sorted(best.params.items()):
        print(f"  {k} = {v}")
    print(best_command(args.experiment, args.profile, best.params, fixed=args.sets, epochs=args.epochs))
    return 0
