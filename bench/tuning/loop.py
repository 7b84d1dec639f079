"""The trial loop of one worker: trials until the study has enough, safe with many workers on one
study; failures in a row stop it, as does a finite space tried through."""

from __future__ import annotations

import sys
import time
import warnings

import optuna
from optuna.trial import TrialState

from bench.servers import retry as outage
from bench.tuning import sampling
from bench.tuning.study import FINISHED, STORAGE, ParentRun, finished, print_trial
from bench.tuning.trial import Repeat, Surplus, TrialContext, TrialFailed, objective

# Trials that fail one after another, whatever their values, point at the setup (the data, the
# device, a --set every trial takes), not at the values: the study stops rather than try forever.
MAX_FAILURES_IN_A_ROW = 5


def optimize(
    study: optuna.Study, ctx: TrialContext, *, trials: int, timeout: float | None, parent: ParentRun, poll_s: float
) -> str | None:
    """Run trials until the study has `trials` finished ones (or `timeout` seconds have passed).

    Safe with many workers on one study, on one machine or many: a worker starts a trial only while
    finished and running trials are fewer than `trials`. When the rest are running elsewhere it
    waits, every `poll_s`, for them to finish or for their heartbeat to go stale: a dead worker's
    trial is then failed and re-queued with its parameters, and the next free worker runs it. Two
    workers that take the last slot at the same instant are told apart by trial number; the later
    trial ends FAIL at once with the user attribute bench.surplus, before it trains or logs.

    A trial that raises ends FAIL (user attributes bench.failure and bench.failure_reason) and
    does not count: the next one is started. Returns why it stopped short of `trials` finished
    trials, if it did: MAX_FAILURES_IN_A_ROW of its own trials failed one after another, or a
    finite search space has no untried set of values left."""
    deadline = None if timeout is None else time.monotonic() + timeout
    report = print_trial(trials)
    ended: list[optuna.trial.FrozenTrial] = []
    failures = 0
    waiting = False
    while deadline is None or time.monotonic() < deadline:
        with warnings.catch_warnings():  # experimental, as the heartbeats are
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        done = sum(s in FINISHED for s in states)
        running = states.count(TrialState.RUNNING)
        if done >= trials:
            return None
        if done + running >= trials:
            if not waiting:
                print(
                    f"waiting for {running} running trial(s) to finish (or to be failed by their heartbeat)",
                    file=sys.stderr,
                    flush=True,
                )
            waiting = True
            time.sleep(poll_s)
            continue
        waiting = False
        if sampling.spent(study, ctx.space):
            return f"every set of values of the search space has been tried: {done} of {trials} trials finished"
        _one_trial(study, ctx, trials, callbacks=[parent, report, lambda _, trial: ended.append(trial)])
        last = ended[-1]
        # Failures of the trials themselves; one turned away before training is not one.
        failed = last.state == TrialState.FAIL and "bench.failure" in last.user_attrs and not sampling.turned_away(last)
        failures = failures + 1 if failed else 0
        if failures >= MAX_FAILURES_IN_A_ROW:
            why = last.user_attrs.get("bench.failure_reason", last.user_attrs["bench.failure"])
            return f"{failures} trials in a row failed, the last with {why}; stopped with {finished(study)} of {trials} trials finished"
    return None


def _one_trial(study: optuna.Study, ctx: TrialContext, trials: int, callbacks: list) -> None:
    """One trial of the study, with `callbacks` told of its end; a stop or an outage goes on up."""
    try:
        study.optimize(
            lambda trial: objective(trial, ctx, limit=trials),
            n_trials=1,
            gc_after_trial=True,
            callbacks=callbacks,
            catch=(Surplus, Repeat, TrialFailed),
        )
    # Optuna has failed the trial by now. Only this worker's: every worker of the study stops at
    # the same moment, and each queues its own trial again.
    except KeyboardInterrupt:
        sampling.queue_interrupted(study, only=ctx.current)
        raise
    except outage.Unavailable as exc:
        if exc.what != STORAGE:
            sampling.queue_interrupted(study, only=ctx.current)
        raise
    except UnboundLocalError as exc:
        # Optuna's end of a trial whose state could not be told (the database away past the
        # limit) reads a state it never set: the outage is what happened.
        if isinstance(exc.__context__, outage.Unavailable):
            raise exc.__context__ from None
        raise
