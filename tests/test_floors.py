"""The version floors in pyproject.toml against NEEDS, the table below of the first release of
each dependency that has what the code calls (found in each project's changelog, and checked by
installing every floor at once and running the tests): a floor lowered below its entry fails
here, and so does an environment older than the floors it claims. A new call that needs a newer
release goes into NEEDS with the code that makes it; this test cannot find such a call itself."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# distribution -> (the first version that has everything the code and tests use from it, why)
NEEDS: dict[str, tuple[str, str]] = {
    "torch": ("2.5", "torch.OutOfMemoryError (device-agnostic), caught by suite and tuning"),
    "torchvision": ("0.20", "the release paired with torch 2.5; ResNet18_Weights enums (0.13+)"),
    "mlflow": ("3.9", "runs on SQLAlchemy 2.1 (older import sqlalchemy.pool.FallbackAsyncAdaptedQueuePool)"),
    "optuna": (
        "5.0",
        "PED-ANOVA default importance evaluator for byte-identical plots; "
        "RetryHeartbeatStaleTrialCallback / heartbeat_stale_trial_callback (4.9)",
    ),
    "pandas": ("2.0", "the oldest release the report and results tests ran on"),
    "seaborn": ("0.12", "lineplot(errorbar=callable)"),
    "scipy": ("1.11.1", "ttest_ind(...).df (1.11; 1.11.0 was yanked)"),
    "tqdm": ("4.60", "the oldest release the tests ran on"),
    "pydantic": (
        "2.10",
        "Field(strict=False) on a tuple in a strict model (2.6); no protected-namespace "
        "warning for MLflow's model_name fields (2.10)",
    ),
    "numpy": ("1.26.1", "numpy._core stubs: the embedded CIFAR pickles were written by numpy 2"),
    "tomli": ("2.0", "tomllib's API on Python 3.10"),
    "psutil": (
        "5.9",
        "cpu_percent, virtual_memory, disk_usage, net_io_counters for MLflow's system metrics "
        "(older 5.x have them too; not tested below 5.9)",
    ),
    "nvidia-ml-py": (
        "12.535",
        "nvmlDeviceGetMemoryInfo / GetUtilizationRates / GetPowerUsage for MLflow's GPU "
        "metrics (not tested below 12.535)",
    ),
    "pytest": ("9.1", "caplog captures records of non-propagating loggers (MLflow's)"),
    "pytest-xdist": (
        "3.6.1",
        "workers run the tests in their main thread, where the signal tests must run (3.6.0, yanked)",
    ),
    "hypothesis": ("6.85", "st.characters(codec=..., categories=...)"),
    "optuna-dashboard": ("0.15", "serves an Optuna 5 study (test_tuning)"),
    "psycopg": ("3.1.4", "the first 3.1 with binary wheels for Python 3.11"),
    "pgserver": ("0.1", "PostgreSQL server binaries for the scale-out tests"),
    "packaging": ("22", "Requirement and Version as this test reads them (strict PEP 440 versions)"),
    "ruff": ("0.17.6", "the rules and format style the code is kept clean with (a later minor may restyle)"),
    "mkdocs": ("1.6", "validation of anchors and links, which `mkdocs build --strict` fails on"),
    "mkdocs-material": ("9.5", "the theme the manual is built with"),
}


def _requirements() -> list[tuple[str, Requirement]]:
    """(group, requirement) for the dependencies and every optional group."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for group, items in project.get("optional-dependencies", {}).items():
        reqs += [(group, Requirement(r)) for r in items]
    return reqs


REQUIREMENTS = _requirements()


def _floor(req: Requirement) -> Version | None:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(floors) if floors else None


def _id(item: tuple[str, Requirement]) -> str:
    return f"{item[0]}:{item[1].name}"


@pytest.mark.parametrize("group, req", REQUIREMENTS, ids=map(_id, REQUIREMENTS))
def test_each_floor_is_at_least_what_the_code_needs(group, req):
    name = canonicalize_name(req.name)
    assert name in NEEDS, f"{req.name} ({group}) has no entry in NEEDS: add the first version the code needs"
    floor = _floor(req)
    assert floor is not None, f"{req} ({group}) states no floor"
    needed, why = NEEDS[name]
    assert floor >= Version(needed), f"{req} ({group}) is below {needed}: {why}"


@pytest.mark.parametrize("group, req", REQUIREMENTS, ids=map(_id, REQUIREMENTS))
def test_each_installed_dependency_meets_its_floor(group, req):
    if req.marker is not None and not req.marker.evaluate({"extra": group}):
        pytest.skip(f"{req.marker} does not hold here")
    try:
        installed = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        if group == "dependencies":
            pytest.fail(f"{req.name} is a dependency and is not installed")
        pytest.skip(f"{req.name} (extra {group}) is not installed")
    assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} does not satisfy {req}"


def test_the_table_names_only_dependencies_that_pyproject_states():
    stated = {canonicalize_name(r.name) for _, r in REQUIREMENTS}
    assert set(NEEDS) - stated == set()
