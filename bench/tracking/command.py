"""`bench register`: the chosen seed's logged model into MLflow's model registry."""

from __future__ import annotations

from bench.errors import UserError, redact
from bench.servers import checks as stores
from bench.tracking import model as logged_model
from bench.tracking import probe
from bench.tracking.store import Tracker, resolve_uri


def register(args) -> int:
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")
    uri = resolve_uri(args.tracking_uri)
    stores.check("tracking store", uri)
    probe.tracking_store(uri)
    model_uri, run_name, version = logged_model.register(
        Tracker(uri).client, args.experiment, args.profile, args.sets, args.epochs
    )
    print(
        f"Registered the model of {run_name} as {args.experiment} version {version}, alias {args.profile}: {model_uri}"
    )
    load = f"import mlflow; model = mlflow.pytorch.load_model('{model_uri}')"
    print(f'Load it: MLFLOW_TRACKING_URI={redact(uri)} python -c "{load}"')
    return 0
