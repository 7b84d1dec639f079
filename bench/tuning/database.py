"""Optuna's RDB storage, made to wait out an outage of its database.

A database that restarts drops every connection: SQLAlchemy's `pool_pre_ping` replaces a dead one
before it is used, and each storage call that meets the database away is made again, with backoff,
up to the outage limit (bench.servers.retry), instead of failing the trial in flight and its worker.

A write whose reply was lost may have been made. The ones that are not the same when made twice are
read back first: a new trial carries a token in its system attributes, by which a second attempt
finds it; a state change that is found made is not made again.
"""

from __future__ import annotations

import datetime
import logging
import time
import uuid
from typing import Any

from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from bench.servers import retry as outage

TOKEN = "bench.create_token"
log = logging.getLogger(__name__)

# RDBStorage's calls that read or write the study, with those Optuna's cache in front of it
# (_CachedStorage) calls on it directly; each is retried as a whole.
CALLS = (
    "_get_trials",
    "_get_best_trial_id",
    "_set_trial_param",
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "set_trial_param",
    "get_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "get_best_trial",
    "get_n_trials",
)


class Storage(RDBStorage):
    """RDBStorage whose calls wait out an outage of the database (see the module)."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.url = url
        self.limit = outage.limit_s()
        self._recovered_at: float | None = None
        self._gave_up = False  # an outage has run out the limit: the next call tries once, until one succeeds
        self._mine: set[int] = set()  # the trials this process runs (made running, or taken from the queue)
        engine_kwargs = dict(kwargs.pop("engine_kwargs", None) or {})
        if not url.startswith("sqlite"):
            engine_kwargs.setdefault("pool_pre_ping", True)  # a connection the restart dropped is replaced before use
        super().__init__(url, engine_kwargs=engine_kwargs, **kwargs)

    def _retry(self, call, before_again=None, limit: float | None = None, give_up: bool = True) -> Any:
        waited = []

        def again():
            waited.append(True)
            return before_again() if before_again is not None else None

        try:
            limit = self.limit if limit is None else limit
            result = outage.retry(
                call, what="Optuna storage", url=self.url, limit=0 if self._gave_up else limit, before_again=again
            )
        except outage.Unavailable:
            self._gave_up = (
                self._gave_up or give_up
            )  # what the worker does next (fail the trial, stop) does not wait the limit again
            raise
        self._gave_up = False
        if waited:
            self._recovered_at = time.monotonic()
        return result

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        token = uuid.uuid4().hex
        if template_trial is None:  # what RDBStorage makes without one: a running trial, started now
            template_trial = FrozenTrial(
                number=-1,
                state=TrialState.RUNNING,
                value=None,
                datetime_start=datetime.datetime.now(),
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
                trial_id=-1,
            )
        template = FrozenTrial(
            number=template_trial.number,
            state=template_trial.state,
            value=None,
            values=template_trial.values,
            datetime_start=template_trial.datetime_start,
            datetime_complete=template_trial.datetime_complete,
            params=template_trial.params,
            distributions=template_trial.distributions,
            user_attrs=template_trial.user_attrs,
            system_attrs={**template_trial.system_attrs, TOKEN: token},
            intermediate_values=template_trial.intermediate_values,
            trial_id=template_trial._trial_id,
        )

        def made():
            for trial in RDBStorage.get_all_trials(self, study_id, deepcopy=False):
                if trial.system_attrs.get(TOKEN) == token:
                    return trial
            return None

        trial = self._retry(lambda: RDBStorage._create_new_trial(self, study_id, template), made)
        if trial.state == TrialState.RUNNING:
            self._mine.add(trial._trial_id)
        return trial

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        def made():
            found = RDBStorage.get_trial(self, trial_id).state
            if state == TrialState.RUNNING and found == TrialState.RUNNING:
                # Taken from the queue, by this worker's lost attempt or by another worker: not
                # ours to run. A heartbeat makes a trial nobody runs stale, to be failed and queued
                # again, instead of running forever.
                RDBStorage.record_heartbeat(self, trial_id)
                return False
            # Finished as asked, a trial this process runs: only its worker tells that, so it was this
            # call. Another's trial failed (as stale): another worker may have failed it, and that
            # one queues its retry; this call is made again, and Optuna takes its refusal as such.
            return True if found == state and trial_id in self._mine else None

        done = self._retry(lambda: RDBStorage.set_trial_state_values(self, trial_id, state, values), made)
        if state == TrialState.RUNNING and done:
            self._mine.add(trial_id)
        return done

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # Right after an outage the trials still running have not beaten again: their heartbeats
        # are as old as the outage. None is stale until a grace period has passed since.
        # At least a heartbeat interval and a backoff: a beat waiting out the outage sleeps that long.
        grace = max(
            self.grace_period or 2 * (self.heartbeat_interval or 0), (self.heartbeat_interval or 0) + outage.MAX_DELAY_S
        )
        stale = self._retry(lambda: RDBStorage._get_stale_trial_ids(self, study_id))  # may itself wait out the outage
        if self._recovered_at is not None and time.monotonic() - self._recovered_at < grace:
            return []
        return stale

    def record_heartbeat(self, trial_id: int) -> None:
        # Optuna's heartbeat thread ends at the first error: one outage past the limit must not end
        # the trial's heartbeat for good while it still trains; the next beat tries again.
        # A beat waits one interval at most: Optuna joins the heartbeat thread when the trial ends
        # (or is interrupted), and the next beat tries again.
        try:
            self._retry(
                lambda: RDBStorage.record_heartbeat(self, trial_id), limit=self.heartbeat_interval, give_up=False
            )
        except outage.Unavailable as exc:
            log.warning("trial heartbeat: %s", exc)


def _waiting(name: str):
    base = getattr(RDBStorage, name)

    def call(self, *args: Any, **kwargs: Any) -> Any:
        return self._retry(lambda: base(self, *args, **kwargs))

    call.__name__, call.__doc__ = name, base.__doc__
    return call


for _name in CALLS:
    if hasattr(RDBStorage, _name):
        setattr(Storage, _name, _waiting(_name))
