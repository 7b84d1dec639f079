"""The experiment, profile and suite files on disk: where they are, which there are, and each
read and checked (`config.load` makes a run's config of them; `bench.config` re-exports these)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from bench.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid TOML: {exc}") from None


def experiments_dir() -> Path:
    """$BENCH_EXPERIMENTS, else ./experiments, else the experiments/ beside the package source."""
    if os.environ.get("BENCH_EXPERIMENTS"):
        return Path(os.environ["BENCH_EXPERIMENTS"])
    here = Path("experiments")
    if (here / "suites.toml").is_file():
        return here
    return Path(__file__).resolve().parent.parent / "experiments"


DESCRIPTIVE_KEYS = (
    "title",
    "about",
    "search",
    "ablations",
)  # an experiment file's prose, search space and ablations: not run config


def list_experiments() -> list[str]:
    return sorted(p.stem for p in experiments_dir().glob("*.toml") if p.stem != "suites")


def list_profiles() -> list[str]:
    return sorted(p.stem for p in (experiments_dir() / "profiles").glob("*.toml"))


def read_experiment(name: str) -> dict[str, Any]:
    if name not in list_experiments():
        raise UserError(f"unknown experiment {name!r}; known: {', '.join(list_experiments())}")
    return read_toml(experiments_dir() / f"{name}.toml")


def about_markdown(name: str) -> str:
    """The experiment file's title and [about] table (what was reported, the sources, the gaps) as
    markdown: the description of its MLflow experiment and runs."""
    exp = read_experiment(name)
    about = exp.get("about") if isinstance(exp.get("about"), dict) else {}
    parts = [f"# {exp.get('title', name)}"]
    if about.get("reported"):
        parts.append(f"**Reported:** {about['reported']}")
    sources = about.get("sources")
    if sources:
        parts.append(
            "**Sources:**\n\n" + "\n".join(f"- {s}" for s in (sources if isinstance(sources, list) else [sources]))
        )
    if about.get("gaps"):
        parts.append(f"**Gaps:** {str(about['gaps']).strip()}")
    return "\n\n".join(parts) + "\n"


def read_profile(name: str) -> dict[str, Any]:
    if name not in list_profiles():
        raise UserError(f"unknown profile {name!r}; known: {', '.join(list_profiles())}")
    path = experiments_dir() / "profiles" / f"{name}.toml"
    prof = read_toml(path)
    seeds = prof.get("seeds", 1)
    if type(seeds) is not int or seeds < 1:
        raise UserError(f"{path}: seeds should be a whole number at least 1, got {seeds!r}")
    parts = {"overrides": prof.get("overrides", {})}
    experiments = prof.get("experiments", {})
    if not isinstance(experiments, dict):
        raise UserError(f"{path}: experiments should be a table of [experiments.NAME.overrides] tables")
    for exp, body in experiments.items():
        if not isinstance(body, dict) or set(body) - {"overrides"}:
            raise UserError(f"{path}: experiments.{exp} should hold only an overrides table")
        parts[f"experiments.{exp}.overrides"] = body.get("overrides", {})
    for key, table in parts.items():
        if not isinstance(table, dict):
            raise UserError(f"{path}: {key} should be a table of config keys, got {table!r}")
    return prof


def read_suites() -> dict[str, list[str]]:
    path = experiments_dir() / "suites.toml"
    suites = read_toml(path)
    for name, body in suites.items():
        exps = body.get("experiments") if isinstance(body, dict) else None
        if not isinstance(exps, list) or not all(isinstance(e, str) for e in exps):
            raise UserError(f'{path}: suite {name} needs experiments = ["NAME", ...]')
    return {name: list(body["experiments"]) for name, body in suites.items()}


def suite_experiments(name: str) -> list[str]:
    suites = read_suites()
    if name not in suites:
        raise UserError(f"unknown suite {name!r}; known: {', '.join(sorted(suites))}")
    return suites[name]


def profile_seeds(profile: str) -> int:
    return read_profile(profile).get("seeds", 1)
