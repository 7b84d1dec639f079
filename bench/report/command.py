"""`bench report`, the command: the suite's runs (and the tuning studies of its experiments) read
through `bench.results`, the report written, one line per row on stdout. The report package itself
never reads MLflow or a study's storage: this module hands it what `results` loaded."""

from __future__ import annotations

import os
from pathlib import Path

from bench import config, results
from bench.errors import UserError, reason, redact, unusable
from bench.paths import check_writable
from bench.report import summarize, write
from bench.servers import checks as stores


def main(args, default_storage: str) -> int:
    """Runs `bench report` for its parsed `args`; `default_storage`: the Optuna storage that
    `bench tune` uses by default, read when its file is here."""
    from bench import tracking
    from bench.tracking import resolve_uri

    names = config.suite_experiments(args.suite)
    if args.profile and args.profile not in config.list_profiles():
        raise UserError(f"unknown profile {args.profile!r}; known: {', '.join(config.list_profiles())}")
    uri = resolve_uri(args.tracking_uri)
    stores.check("tracking store", uri)
    out = args.out or Path("reports") / args.suite
    check_writable(out, "--out")
    studies = _studies(args.storage, names, default_storage)
    tracking.probe.tracking_store(uri)
    found = results.load(uri, names)
    if found.runs.empty:
        raise UserError(
            f"no runs of suite {args.suite!r} in {redact(uri)}; train them first: bench run --suite {args.suite}"
        )
    summary = summarize(found, names, suite=args.suite, profile=args.profile)
    try:
        path = write(summary, out, studies)
    except OSError as exc:
        raise UserError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    for row in summary.rows:
        name = row.experiment if row.is_recipe else f"{row.experiment}, {row.label}"
        seeds = f"{row.final.n} seed" + ("" if row.final.n == 1 else "s")
        print(
            f"  {name:30s} {seeds}  {row.verdict}" + (f" ({row.why_not_comparable})" if row.why_not_comparable else "")
        )
    if studies is not None and studies.handles:
        print(f"  tuning: {', '.join(sorted(studies.handles))}")
    print(f"Report: {path}")
    return 0


def _studies(storage: str | None, experiments: list[str], default_storage: str):
    """The tuning studies for the report, or None when there is no storage to read."""
    url = storage or os.environ.get("BENCH_OPTUNA_STORAGE")
    if url is None and Path("optuna.db").is_file():
        url = default_storage
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
