"""The search space: the dotted config keys a study samples and their distributions (the experiment
file's [search] table, else a default around the recipe), the recipe's own values as the first
trial, and the validation split tuning holds out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from bench import config
from bench.errors import UserError


@dataclass(frozen=True)
class Param:
    name: str  # a dotted config path
    kind: str  # float, int or categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def distribution(self) -> BaseDistribution:
        """The distribution `suggest` asks Optuna for."""
        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"categorical {list(self.choices)}"
        return f"{self.kind} [{self.low:g}, {self.high:g}]" + (" log" if self.log else "")


def _default_space(cfg: config.RunConfig) -> dict[str, dict[str, Any]]:
    """A decade either side of the recipe's lr and weight decay; half and double its batch."""
    lr, wd, batch = cfg.optim.lr, cfg.optim.weight_decay, cfg.data.batch_size
    return {
        "optim.lr": {"type": "float", "low": lr / 10, "high": lr * 10, "log": True},
        "optim.weight_decay": {"type": "float", "low": max(wd, 1e-7) / 10, "high": max(wd, 1e-7) * 10, "log": True},
        "data.batch_size": {"type": "categorical", "choices": [batch // 2, batch, batch * 2]},
    }


def search_space(experiment: str, cfg: config.RunConfig) -> list[Param]:
    """The experiment file's [search] table (dotted path -> distribution), else the default.

    A categorical space always holds the recipe's own value, so the reported recipe can be the
    first trial.
    """
    table = config.read_experiment(experiment).get("search") or _default_space(cfg)
    flat = cfg.flat()
    where = f"{experiment}: [search]"
    if not isinstance(table, dict):
        raise UserError(f"{where} should be a table of dotted config keys, got {table!r}")
    params = []
    for name, spec in sorted(table.items()):
        if name not in flat or name == "seed":
            raise UserError(f"{where}: {name!r} is not a config key (see `bench run {experiment} --dry-run`)")
        if not isinstance(spec, dict):
            raise UserError(f'{where}: {name}: should be a table such as {{ type = "float", low = 0.01, high = 0.5 }}')
        kind = spec.get("type")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices or not all(_same_kind(c, flat[name]) for c in choices):
                raise UserError(f"{where}: {name}: a categorical needs choices = [...] of values like {flat[name]!r}")
            choices = list(choices)
            if flat[name] not in choices:
                choices.append(flat[name])
            params.append(Param(name, kind, choices=tuple(sorted(choices))))
        elif kind in ("float", "int"):
            low, high = spec.get("low"), spec.get("high")
            if any(type(v) not in (int, float) or not math.isfinite(v) for v in (low, high)) or not low < high:
                raise UserError(f"{where}: {name}: needs numbers low < high, got low={low!r} high={high!r}")
            if spec.get("log") and low <= 0:
                raise UserError(f"{where}: {name}: a log scale needs low > 0, got {low!r}")
            params.append(Param(name, kind, float(low), float(high), bool(spec.get("log", False))))
        else:
            raise UserError(f"{where}: {name}: type must be float, int or categorical, got {kind!r}")
    return params


def _same_kind(choice: Any, recipe: Any) -> bool:
    """A choice the config key can take: of the recipe value's type (an int where it is a float)."""
    if isinstance(recipe, float):
        return type(choice) in (int, float) and math.isfinite(choice)
    return type(choice) is type(recipe)


def recipe_values(space: list[Param], cfg: config.RunConfig) -> dict[str, Any]:
    """The recipe's own values of the searched keys, clipped into the space: the first trial."""
    flat = cfg.flat()
    values = {}
    for p in space:
        v = flat[p.name]
        values[p.name] = v if p.kind == "categorical" else min(max(v, p.low), p.high)
    return values


def as_sets(values: dict[str, Any]) -> list[str]:
    """Trial values as `--set` assignments (TOML values), in key order."""
    return [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in sorted(values.items())]


def tuning_val_size(cfg: config.RunConfig, train_images: int) -> int | None:
    """The validation split tuning holds out when the recipe trains on every training image
    (data.val_size 0, as R1 and R2 did): trials are chosen by validation accuracy, never by the
    test set. A tenth of the training images: CIFAR's usual 5000 of 50,000, 100 of the smoke
    profile's 1000. None when the recipe holds out a split already."""
    return None if cfg.data.val_size else train_images // 10
