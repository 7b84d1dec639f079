"""Ablations: each quirk of a reported recipe flipped alone, and all of them standard together.

An experiment file lists its quirk switches as `[ablations.NAME]` tables: the values that flip it
(`set`), whether they are the standard value or another value the sources report (`kind`), where
it comes from (`source`), and whether it changes only how accuracy is measured
(`evaluation_only`). A profile may give an ablation's values at its own scale (`[ablations]` in
the profile: the embedded subset cannot hold out CIFAR's 5000 validation images).

A trained variant is an ordinary cell: the recipe under the profile with the ablation's values as
`--set`. An evaluation-only variant trains nothing: every run of the experiment measures it again
on its own weights each epoch, logged as `<metric>/<key>-<value>` (`test_acc/eval.mode-eval`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bench import config
from bench.errors import UserError

KINDS = {"standard": "the standard value", "reported": "another value the sources report"}
# Keys that change how accuracy is measured and nothing that is learned (the engine evaluates in
# its own random streams): the only keys an evaluation-only ablation may set.
EVALUATION_KEYS = {"eval.mode": "test_acc", "eval.remeasure_train_acc": "train_acc"}  # key -> the metric it changes
RECIPE, ALL_STANDARD = "recipe", "all-standard"
TRAINED, EVALUATION_ONLY = "trained", "evaluation only"


def toml_value(value: Any) -> str:
    """A value as `--set` and TOML write it: true, 0.1, "eval", [32, 64]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def shown(value: Any) -> str:
    """A value as the tables show it: strings without quotes."""
    return value if isinstance(value, str) else toml_value(value)


@dataclass(frozen=True)
class Ablation:
    name: str
    values: dict[str, Any]  # dotted config key -> the value that flips the switch
    kind: str  # a key of KINDS
    source: str
    evaluation_only: bool

    @property
    def sets(self) -> list[str]:
        return [f"{k}={toml_value(v)}" for k, v in self.values.items()]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={shown(v)}" for k, v in self.values.items())

    @property
    def suffix(self) -> str:
        """The metric-name suffix of an evaluation-only ablation's figures: `eval.mode-eval`."""
        ((key, value),) = self.values.items()
        return f"{key}-{shown(value)}"

    @property
    def metric(self) -> str:
        """The per-epoch metric the switch changes: test_acc, or train_acc for the re-measure."""
        if self.evaluation_only:
            return EVALUATION_KEYS[next(iter(self.values))]
        return "test_acc"

    def metric_name(self, metric: str | None = None) -> str:
        """The name an evaluation-only ablation's figure is logged under."""
        return f"{metric or self.metric}/{self.suffix}"


def read(experiment: str) -> list[Ablation]:
    """The experiment file's ablations, in file order, checked."""
    where = f"{config.experiments_dir() / experiment}.toml"
    table = config.read_experiment(experiment).get("ablations", {})
    if not isinstance(table, dict):
        raise UserError(f"{where}: ablations should be [ablations.NAME] tables")
    out = []
    for name, body in table.items():
        at = f"{where}: ablations.{name}"
        if name in (RECIPE, ALL_STANDARD):
            raise UserError(f"{at}: the name is taken by the variant of the same name")
        if not isinstance(body, dict) or set(body) - {"set", "kind", "source", "evaluation_only"}:
            raise UserError(f"{at} should hold set, kind, source and evaluation_only only")
        values = body.get("set")
        if not isinstance(values, dict) or not values:
            raise UserError(f'{at}: set should be a table of config keys, e.g. set = {{ "optim.lr" = 0.1 }}')
        if body.get("kind") not in KINDS:
            raise UserError(f"{at}: kind should be one of {', '.join(KINDS)}, got {body.get('kind')!r}")
        if not isinstance(body.get("source"), str) or not body["source"].strip():
            raise UserError(f"{at}: source should say where the value comes from")
        evaluation_only = body.get("evaluation_only", False)
        measuring = set(values) <= set(EVALUATION_KEYS)
        if evaluation_only is not measuring:
            raise UserError(
                f"{at}: evaluation_only should be {str(measuring).lower()}: "
                f"only {', '.join(EVALUATION_KEYS)} change how accuracy is measured and nothing that is learned"
            )
        if evaluation_only and len(values) != 1:
            raise UserError(f"{at}: an evaluation-only ablation flips one key")
        out.append(Ablation(name, dict(values), body["kind"], body["source"].strip(), evaluation_only))
    return out


def profile_values(profile: str) -> dict[str, Any]:
    """The profile's values for keys that ablations set, by dotted key; a key no experiment's
    ablation sets is a mistake (a misspelt key would leave the paper's value in place)."""
    where = f"{config.experiments_dir() / 'profiles' / profile}.toml"
    table = config.read_profile(profile).get("ablations", {})
    if not isinstance(table, dict):
        raise UserError(f"{where}: ablations should be a table of config keys")
    values = config.flatten(table)
    # Every experiment's ablations are read only for a key the profile names: a mistake in one
    # experiment file then stops only the commands that read that file or this key.
    unknown = (
        sorted(set(values) - {k for name in config.list_experiments() for a in read(name) for k in a.values})
        if values
        else []
    )
    if unknown:
        raise UserError(f"{where}: ablations.{unknown[0]}: no experiment's ablation sets this key")
    scaled_measure = sorted(set(values) & set(EVALUATION_KEYS))
    if scaled_measure:  # its metric's name holds the value the engine measures with
        raise UserError(f"{where}: ablations.{scaled_measure[0]}: an evaluation-only switch has no scale to change")
    return values


def at_profile(ablation: Ablation, scaled: dict[str, Any]) -> Ablation:
    """The ablation with a profile's values (`profile_values`) for the keys it sets."""
    return dataclasses.replace(ablation, values={k: scaled.get(k, v) for k, v in ablation.values.items()})


@dataclass(frozen=True)
class Variant:
    """One row of an ablation: the recipe, one switch flipped, or all standard switches at once."""

    name: str
    kind: str  # TRAINED or EVALUATION_ONLY
    sets: tuple[str, ...]
    label: str  # the values it changes, "-" for the recipe
    source: str
    config_hash: str  # of the config it trains; the recipe's for an evaluation-only variant
    ablation: Ablation | None = None  # None for the recipe and all-standard
    same_as: str | None = None  # another variant this one trains the same config as

    @property
    def metric(self) -> str:
        return self.ablation.metric if self.ablation is not None else "test_acc"


def variants(experiment: str, profile: str) -> list[Variant]:
    """The recipe, each ablation alone (at the profile's scale), and all standard ablations
    together (when there are two or more of them): every config checked. A variant that trains
    the recipe's config or another variant's is kept, marked `same_as` that one."""
    scaled = profile_values(profile)
    ablations = [at_profile(a, scaled) for a in read(experiment)]
    recipe = config.load(experiment, profile=profile)
    out = [Variant(RECIPE, TRAINED, (), "-", "the reported recipe", recipe.config_hash())]
    standard = [a for a in ablations if a.kind == "standard"]
    rows: list[tuple[str, Ablation | None, list[str], str, str]] = [
        (a.name, a, a.sets, a.label, f"{KINDS[a.kind]}: {a.source}") for a in ablations
    ]
    if len(standard) >= 2 and any(not a.evaluation_only for a in standard):
        sets = [s for a in standard for s in a.sets]
        rows.append(
            (ALL_STANDARD, None, sets, "; ".join(a.label for a in standard), "every standard value above, together")
        )
    seen = {recipe.config_hash(): RECIPE}
    for name, ablation, sets, label, source in rows:
        try:
            cfg = config.load(experiment, profile=profile, sets=sets)
        except UserError as exc:
            raise UserError(f"ablation {name} of {experiment}: {exc}") from None
        if ablation is not None and ablation.evaluation_only:
            # A recipe that already measures this way has the variant's figures as its own.
            ((key, value),) = ablation.values.items()
            same = RECIPE if recipe.flat()[key] == value else None
            out.append(Variant(name, EVALUATION_ONLY, tuple(sets), label, source, recipe.config_hash(), ablation, same))
            continue
        h = cfg.config_hash()
        out.append(Variant(name, TRAINED, tuple(sets), label, source, h, ablation, seen.get(h)))
        seen.setdefault(h, name)
    return out


def alternatives(experiment: str, cfg: config.RunConfig) -> list[tuple[str, config.EvalConfig]]:
    """The evaluation-only ablations that `cfg` does not already measure as they ask: (metric
    suffix, the evaluation config to measure with) for the engine's extra evaluation passes."""
    out = []
    for a in read(experiment):
        if not a.evaluation_only:
            continue
        ((key, value),) = a.values.items()
        field = key.removeprefix("eval.")
        if getattr(cfg.eval, field) != value:
            out.append((a.suffix, cfg.eval.model_copy(update={field: value})))
    return out
