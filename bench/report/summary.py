"""Which runs answer each reported run: the recipe's and other configs' runs, their intervals,
verdicts and the cost of their models. Works on the frames of `results.load` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from bench import ablation, config, reference, stats
from bench.errors import UserError
from bench.models import cost
from bench.results import Results

BOTTLENECK_PAIR = ("bottleneck-cifar10", "resnetb-cifar10")
FULL_COUNTS = 60000  # train + val + test images of the official CIFAR-10/100


@dataclass(frozen=True)
class Recipe:
    """A config as the report compares it: its config hash (result keys only) and its result
    keys as MLflow params (seed left out)."""

    config_hash: str
    params: dict[str, str]
    earlier_hash: str | None = None  # the hash bench gave the same config before (bench.config.RunConfig.earlier_hash)


def recipe(experiment: str, profile: str) -> Recipe:
    """The experiment's recipe under the profile: `config.load` with no --set."""
    cfg = config.load(experiment, profile=profile, seed=0)
    params = cfg.params()
    return Recipe(cfg.config_hash(), {k: params[k] for k in cfg.result_keys() if k != "seed"}, cfg.earlier_hash())


@dataclass
class Row:
    """One reported run beside the suite's runs of one config: the recipe's (label None), or
    another config's (tuned values, an ablation), labelled by the keys where it differs."""

    reported: reference.ReportedRun
    figures: dict  # reference.headline(): final_test_acc, best_test_acc, best_epoch, seconds_per_epoch
    runs: pd.DataFrame  # the selected runs (finished, one profile, one config)
    final: stats.Interval
    best: stats.Interval
    verdict: str
    why_not_comparable: str | None
    recipe_diff: list[str]  # result keys where this profile's recipe differs from the paper's
    excluded: dict[str, int] = field(default_factory=dict)
    seconds_per_epoch: float | None = None  # of the metric the reported figure names (train_time_s or epoch_time_s)
    label: str | None = None
    cost: cost.Cost | None = None  # the config's model: parameters and forward GFLOPs per image
    config_hash: str | None = None  # the config's current hash (its runs may carry an earlier one)

    @property
    def device_hours(self) -> float | None:
        """Device time of one seed: each run's epochs (training and evaluation) summed, in hours,
        the mean over the row's runs."""
        totals = self.runs.total_epoch_time_s.dropna() if "total_epoch_time_s" in self.runs else []
        return float(totals.mean()) / 3600 if len(totals) else None

    @property
    def experiment(self) -> str:
        return self.reported.experiment

    @property
    def is_recipe(self) -> bool:
        return self.label is None


@dataclass
class Summary:
    suite: str
    profile: str
    rows: list[Row]
    comparison: stats.Welch | None
    metrics: pd.DataFrame  # per-epoch metrics of the selected runs
    curves: pd.DataFrame  # the reported per-epoch figures of the suite's experiments
    results: Results | None = None  # every run read, selected or not: the exports' source
    ablations: dict[str, list[ablation.Variant]] = field(default_factory=dict)  # experiment -> its ablation's variants
    ablation_errors: dict[str, str] = field(
        default_factory=dict
    )  # experiment -> why its ablation is invalid under the profile

    @property
    def recipe_rows(self) -> list[Row]:
        """One row per reported run: the recipe's runs, whatever other configs ran beside them."""
        return [r for r in self.rows if r.is_recipe]


def choose_profile(runs: pd.DataFrame, requested: str | None) -> str:
    """The requested profile; else "paper" when it has finished runs; else the profile with the
    most finished runs (ties by name)."""
    if requested:
        return requested
    done = runs[(runs.mlflow_status == "FINISHED") & (runs.kind == "cell")]
    if (done.profile == "paper").any() or done.empty:
        return "paper"
    counts = done.groupby("profile").size()
    return sorted(counts.index, key=lambda p: (-counts[p], p))[0]


def select(runs: pd.DataFrame, experiment: str, profile: str) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """The finished runs of one experiment and profile by config hash (the newest run of each
    seed), and how many runs were left out and why."""
    mine = runs[(runs.kind == "cell") & (runs.experiment == experiment)]
    excluded: dict[str, int] = {}
    other = int((mine.profile != profile).sum())
    if other:
        excluded["other profiles"] = other
    mine = mine[mine.profile == profile]
    done = mine[(mine.mlflow_status == "FINISHED") & (mine.status == "finished")]
    if len(mine) - len(done):
        excluded["not finished"] = len(mine) - len(done)
    # A cell re-run from scratch leaves two finished runs of one seed: keep the newest.
    done = done.sort_values("start_time").drop_duplicates(["config_hash", "seed"], keep="last")
    return {h: g.sort_values("seed", ignore_index=True) for h, g in done.groupby("config_hash", sort=True)}, excluded


def differing(params: dict[str, str], base: dict[str, str]) -> list[str]:
    """The keys of either set where the two differ, sorted."""
    return sorted(k for k in base.keys() | params.keys() if params.get(k) != base.get(k))


def variant_label(runs: pd.DataFrame, base: Recipe) -> str:
    """A config by the result keys where its runs' params differ from the recipe's:
    "optim.lr=0.05, data.batch_size=256"; its hash when the params do not show it."""
    first = runs.iloc[0]
    params = {k: str(first[k]) for k in base.params if k in runs.columns and pd.notna(first[k])}
    keys = differing(params, base.params)
    return ", ".join(f"{k}={params.get(k, '-')}" for k in keys) or f"config {first.config_hash}"


COST_KEYS = ("model.", "data.image_size", "data.dataset")  # the result keys that change a model's cost


def config_cost(experiment: str, profile: str, sets: list[str]) -> cost.Cost | None:
    """The cost of the experiment's model under the profile and --set values; None when the
    values no longer make a config (an option renamed since the run)."""
    try:
        return cost.of_config(config.load(experiment, profile=profile, sets=sets))
    except (UserError, ValueError):
        return None


def variant_cost(
    runs: pd.DataFrame, experiment: str, profile: str, base: Recipe, recipe_cost: cost.Cost | None
) -> cost.Cost | None:
    """The cost of another config: the recipe's, unless its runs' params change the model."""
    first = runs.iloc[0]
    keys = [
        k
        for k in base.params
        if k.startswith(COST_KEYS) and k in runs.columns and pd.notna(first[k]) and str(first[k]) != base.params[k]
    ]
    if not keys:
        return recipe_cost
    # Params are str() of the value: Python's True/False, where --set takes TOML's true/false.
    return config_cost(
        experiment, profile, [f"{k}={ {'True': 'true', 'False': 'false'}.get(str(first[k]), first[k]) }" for k in keys]
    )


def _values(runs: pd.DataFrame, column: str) -> pd.Series:
    """One value per run of a column that runs without that metric lack entirely."""
    return runs[column].dropna() if column in runs else pd.Series(dtype=float)


def _row(
    results: Results,
    run: reference.ReportedRun,
    figures: dict,
    runs: pd.DataFrame,
    diff: list[str],
    excluded: dict[str, int],
    label: str | None,
    model_cost: cost.Cost | None,
    config_hash: str | None,
) -> Row:
    final = stats.accuracy_ci(_values(runs, "final_test_acc"))
    best = stats.accuracy_ci(_values(runs, "best_test_acc"))
    if runs.empty:
        why = "no finished runs"
    elif not complete_data(runs):
        why = "subset of CIFAR"
    elif label is not None:
        why = "another config"
    elif diff:
        why = "recipe differs"
    else:
        why = None
    verdict = "not comparable" if why else stats.verdict(figures["final_test_acc"], final)
    metrics = results.metrics
    times = metrics[metrics.run_id.isin(runs.run_id) & (metrics.metric == run.seconds_per_epoch_metric)]
    return Row(
        reported=run,
        figures=figures,
        runs=runs,
        final=final,
        best=best,
        verdict=verdict,
        why_not_comparable=why,
        recipe_diff=diff,
        excluded=excluded,
        seconds_per_epoch=float(times.value.mean()) if len(times) else None,
        label=label,
        cost=model_cost,
        config_hash=config_hash,
    )


def complete_data(runs: pd.DataFrame) -> bool:
    if runs.data_complete.notna().all():
        return bool((runs.data_complete == "true").all())
    counts = runs.data_train.fillna(0) + runs.data_val.fillna(0) + runs.data_test.fillna(0)
    return bool((counts == FULL_COUNTS).all())


def summarize(
    results: Results,
    experiments: list[str],
    *,
    suite: str,
    profile: str | None = None,
    curves: pd.DataFrame | None = None,
    reported: dict[str, reference.ReportedRun] | None = None,
    recipes: dict[str, Recipe] | None = None,
    paper: dict[str, Recipe] | None = None,
    variants: dict[str, list[ablation.Variant]] | None = None,
) -> Summary:
    """Put each experiment's runs beside its reported figures: a row for the recipe's runs (the
    config hash of the experiment under the profile, no --set), then one per other config.
    `curves` and `reported` default to experiments/reference/, `recipes` to each experiment's
    recipe under the chosen profile, `paper` to its recipe under the paper profile and `variants`
    to its ablation's variants under the chosen profile (`ablation.variants`)."""
    curves = reference.load_curves() if curves is None else curves
    reported = reference.load_runs() if reported is None else reported
    profile = choose_profile(results.runs, profile)
    rows = []
    ablations, ablation_errors = {}, {}
    for name in experiments:
        if name not in reported:
            continue
        try:
            ablations[name] = variants.get(name, []) if variants is not None else ablation.variants(name, profile)
            earlier = earlier_hashes(name, profile, ablations[name])
        except UserError as exc:  # that experiment's table says why; the rest of the report stands
            ablations[name], earlier, ablation_errors[name] = [], {}, str(exc)
        mine = recipes[name] if recipes is not None else recipe(name, profile)
        theirs = paper[name] if paper is not None else recipe(name, "paper")
        figures = reference.headline(curves, reported[name])
        rows += _experiment_rows(
            results, name, profile, reported[name], figures, mine, theirs, ablations[name], earlier
        )
    by_name = {r.experiment: r for r in rows if r.is_recipe}
    comparison = None
    if all(n in by_name for n in BOTTLENECK_PAIR):
        a, b = (_values(by_name[n].runs, "final_test_acc") for n in BOTTLENECK_PAIR)
        comparison = stats.welch(a, b)
    selected = pd.concat([r.runs.run_id for r in rows]) if rows else pd.Series(dtype=str)
    metrics = results.metrics[results.metrics.run_id.isin(selected)]
    return Summary(
        suite,
        profile,
        rows,
        comparison,
        metrics,
        curves[curves.experiment.isin(experiments)],
        results,
        ablations,
        ablation_errors,
    )


def _experiment_rows(
    results: Results,
    name: str,
    profile: str,
    reported: reference.ReportedRun,
    figures: dict,
    mine: Recipe,
    theirs: Recipe,
    variants: list[ablation.Variant],
    earlier: dict[str, str],
) -> list[Row]:
    """One experiment's rows: its recipe's runs (`mine`) against the reported figures, then one
    row per other config its runs were trained with."""
    groups, excluded = select(results.runs, name, profile)
    diff = [] if mine.config_hash == theirs.config_hash else differing(mine.params, theirs.params)
    empty = results.runs.iloc[0:0]
    # Runs of the recipe made before the hash counted only result keys (not yet carried over
    # by a `bench run`) are the recipe's too; a seed run under both counts once, the newest.
    parts = [g for g in (groups.pop(mine.config_hash, None), groups.pop(mine.earlier_hash, None)) if g is not None]
    ours = newest_per_seed(parts) if parts else empty
    for now, before in earlier.items():  # a variant's runs under its earlier hash are the variant's
        if before in groups:
            groups[now] = newest_per_seed([g for g in (groups.get(now), groups.pop(before)) if g is not None])
    recipe_cost = config_cost(name, profile, [])
    rows = [_row(results, reported, figures, ours, diff, excluded, None, recipe_cost, mine.config_hash)]
    # A trained ablation's runs are another config's row, named by the ablation and the values
    # it sets (the first variant's where two train the same config).
    named = {
        v.config_hash: f"ablation {v.name}: {v.label}"
        for v in reversed(variants)
        if v.kind == ablation.TRAINED and v.name != ablation.RECIPE
    }
    others = [(named.get(h) or variant_label(runs, mine), h, runs) for h, runs in groups.items()]
    rows += [
        _row(results, reported, figures, runs, diff, {}, label, variant_cost(runs, name, profile, mine, recipe_cost), h)
        for label, h, runs in sorted(others, key=lambda v: v[0])
    ]
    return rows


def newest_per_seed(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The runs of one config found under its hashes: a seed run under both counts once, the newest."""
    return (
        pd.concat(parts)
        .sort_values("start_time")
        .drop_duplicates("seed", keep="last")
        .sort_values("seed", ignore_index=True)
    )


def earlier_hashes(experiment: str, profile: str, variants: list[ablation.Variant]) -> dict[str, str]:
    """Each trained variant's config hash -> the hash bench gave that config before
    (`config.RunConfig.earlier_hash`), where it had one; the recipe's is `Recipe.earlier_hash`."""
    out = {}
    for v in variants:
        if v.kind == ablation.TRAINED and v.name != ablation.RECIPE and not v.same_as:
            before = config.load(experiment, profile=profile, sets=list(v.sets)).earlier_hash()
            if before and before != v.config_hash:
                out[v.config_hash] = before
    return out
