"""Which values a study tries next: the sampler, never a set of values tried already, seeded so
that the same commands make the same trials, and the retries of interrupted trials.

Optuna's samplers may propose a set of values again (TPE settles on one choice of a categorical
space; a continued study's sampler replays its seed's draws): `Unrepeated` wraps one so that a
study tries each set once, the retry of a dead or interrupted trial aside.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import warnings
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import TrialState


def sampler(name: str, seed: int | None, space: list) -> optuna.samplers.BaseSampler:
    base = optuna.samplers.RandomSampler(seed=seed) if name == "random" else optuna.samplers.TPESampler(seed=seed)
    return Unrepeated(base, space, seed)


def sampler_seed(seed: int, store, study_name: str, *, alone: bool) -> int | None:
    """The sampler's seed for a process alone on its study: drawn from `seed` and the number of
    trials the study holds already. A continued study gets a new seed, so its sampler does not
    replay the draws that made its first trials (TPE's random start-up, the random sampler), and
    the same commands on a fresh store make the same trials. None (fresh entropy) for the workers
    of a `--workers` command and for a process that finds trials of other processes running:
    their trials depend on timing and cannot be repeated, and they must not draw in step with
    each other (worker i of two machines' commands would, with seeds of their own)."""
    if not alone:
        return None
    try:
        study = optuna.load_study(study_name=study_name, storage=store)
    except KeyError:  # a new study
        held = 0
    else:
        with warnings.catch_warnings():  # experimental, as the heartbeats are
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a trial of a process killed before is not running
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.RUNNING for t in trials):
            return None
        held = len(trials)
    digest = hashlib.sha256(repr((seed, held)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _key(values: dict[str, Any]) -> tuple:
    return tuple(sorted(values.items()))


def _queued(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial queued with its values: the recipe (enqueued), or a dead trial's retry (its copy)."""
    return "fixed_params" in trial.system_attrs or "failed_trial" in trial.system_attrs


def turned_away(trial: optuna.trial.FrozenTrial) -> bool:
    """Ended before training: its values were another trial's, or the study was full."""
    return trial.user_attrs.get("bench.failure") == "repeat" or bool(trial.user_attrs.get("bench.surplus"))


def tried(trials: list[optuna.trial.FrozenTrial], but: int | None = None) -> set[tuple]:
    """The value sets the trials hold, other than trial `but`'s: run, running, or queued (the
    recipe, a dead trial's retry); a trial turned away before training holds none."""
    return {
        _key(t.params or t.system_attrs.get("fixed_params", {}))
        for t in trials
        if t.number != but and (t.params or "fixed_params" in t.system_attrs) and not turned_away(t)
    }


def all_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Every trial of the study. Under the hyperband pruner a sampler is handed a view of one
    bracket's trials (its `get_trials` filters them); the storage holds them all."""
    return study._storage.get_all_trials(study._study_id, deepcopy=False)


def untried_sets(study: optuna.Study, space: list) -> int | None:
    """How many sets of values of a finite search space no trial holds; None for another space."""
    grid = _grid({p.name: p.distribution() for p in space}, Unrepeated.GRID_LIMIT)
    if grid is None:
        return None
    taken = tried(study.get_trials(deepcopy=False))
    return sum(_key(values) not in taken for values in grid)


def spent(study: optuna.Study, space: list) -> bool:
    """A finite search space with no untried set left and no queued trial (a queued retry holds
    a set counted as tried, and is still to run)."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return not waiting and untried_sets(study, space) == 0


class Unrepeated(optuna.samplers.BaseSampler):
    """`base`, but never a set of values the study has tried already (Optuna's samplers may
    propose one again: TPE settles on one choice of a categorical-only space).

    The whole static space is drawn at once, as Optuna's relative sampling lets a sampler do: the
    base sampler's proposal if it is new, else, after a few, one drawn at random among the untried
    sets. A queued trial (the recipe, a dead trial's retry) keeps its values. Workers that draw at
    the same instant do not see each other's draw; their seeds differ, and the objective turns away
    a set that is tried already."""

    BASE_DRAWS = 8
    GRID_LIMIT = 100_000  # larger finite spaces, and spaces with a float, do not repeat by chance

    def __init__(self, base: optuna.samplers.BaseSampler, space: list, seed: int | None) -> None:
        self.base = base
        self.space = {p.name: p.distribution() for p in space}
        self.rng = np.random.RandomState(seed)
        self.uniform = optuna.samplers.RandomSampler(seed=int(self.rng.randint(2**31)))

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {} if _queued(trial) else dict(self.space)

    def sample_relative(self, study, trial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        taken = tried(all_trials(study), trial.number)
        # The base's own relative draw first (Optuna 5's TPE is multivariate: it draws the values
        # together, from what it learnt of them together), the parameters it leaves one by one.
        relative = {n: d for n, d in self.base.infer_relative_search_space(study, trial).items() if n in search_space}
        for _ in range(self.BASE_DRAWS):
            values = dict(self.base.sample_relative(study, trial, relative)) if relative else {}
            values.update(
                {
                    n: self.base.sample_independent(study, trial, n, d)
                    for n, d in search_space.items()
                    if n not in values
                }
            )
            if _key(values) not in taken:
                return values
        grid = _grid(search_space, self.GRID_LIMIT)
        if grid is None:
            return {n: self.uniform.sample_independent(study, trial, n, d) for n, d in search_space.items()}
        untried = [values for values in grid if _key(values) not in taken]
        # None left: the base's proposal goes through, the objective turns it away, and `optimize`
        # stops before asking for another.
        return untried[self.rng.randint(len(untried))] if untried else {}

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self.uniform.reseed_rng()
        self.rng.seed()


def _grid(space: dict[str, BaseDistribution], limit: int) -> list[dict[str, Any]] | None:
    """Every set of values of a finite space of at most `limit` sets; None for another space."""
    axes = []
    for d in space.values():
        if isinstance(d, CategoricalDistribution):
            axes.append(list(d.choices))
        elif isinstance(d, IntDistribution):
            axes.append(list(range(d.low, d.high + 1, d.step)))
        else:
            return None
    if math.prod(len(a) for a in axes) > limit:
        return None
    return [dict(zip(space, combo)) for combo in itertools.product(*axes)]


def repeats(trial: optuna.Trial) -> bool:
    """True when an earlier trial holds the values this one drew (two workers drew at the same
    instant, or the space has no untried set left): of two such trials the later one gives way,
    so the values are trained once. A queued trial keeps its values."""
    trials = trial.study.get_trials(deepcopy=False)
    me = next(t for t in trials if t.number == trial.number)
    return not _queued(me) and _key(trial.params) in tried([t for t in trials if t.number < trial.number])


# Failures that say nothing of the trial's values: it is trained again, with the same values.
RETRIED = ("interrupted", "tracking_unavailable")


def queue_interrupted(study: optuna.Study, only: int | None = None) -> list[int]:
    """Queue a copy, with the same values, of each trial that an interruption (SIGTERM, Ctrl-C)
    or an outage of the tracking server past the limit failed and that has no retry yet: optuna fails such a trial at once, where a trial whose
    process was killed outright is failed by its heartbeat, which queues the retry. Called when
    the interruption happens, and by `bench tune` before it starts (a process killed while it
    queued the retry). `only`: that trial alone (the one this worker ran). The numbers of the
    trials queued."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("bench.retry_of") for t in trials} | {
        t.system_attrs.get("failed_trial") for t in trials
    }
    queued = []
    for t in trials:
        if only is not None and t.number != only:
            continue
        if (
            t.state == TrialState.FAIL
            and t.user_attrs.get("bench.failure") in RETRIED
            and t.number not in retried
            and t.params
        ):
            recipe = {k: v for k, v in t.user_attrs.items() if k == "bench.recipe"}
            study.enqueue_trial(t.params, user_attrs={**recipe, "bench.retry_of": t.number})
            queued.append(t.number)
    return queued
