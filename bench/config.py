"""Typed run config: load an experiment TOML, apply profile and --set overrides, validate once.

One naming scheme everywhere: the dotted path (`optim.lr`, `data.batch_size`) is the TOML key,
the `--set` key, the Optuna parameter, the MLflow param and the report column.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator

from bench import process
from bench.errors import UserError
from bench.experiments import (  # noqa: F401 (the files on disk: config.X as callers know them)
    DESCRIPTIVE_KEYS,
    about_markdown,
    experiments_dir,
    list_experiments,
    list_profiles,
    profile_seeds,
    read_experiment,
    read_profile,
    read_suites,
    read_toml,
    suite_experiments,
)

if TYPE_CHECKING:
    pass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


# A key whose value changes what a run learns or measures is a result key: the config hash (a
# cell's identity, the tracking tag bench.config_hash, a checkpoint's config_hash) and the report's
# "comparable" use only those. Fields marked NOT_RESULT change how fast a run goes, how it is
# checkpointed or logged, or name it; "result_when" makes a field a result key under a condition.
NOT_RESULT = {"result": False}


class Section(BaseModel):
    # Strict: `--set optim.lr=true` or `train.epochs="3"` is a mistake, not a value to coerce.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ModelConfig(BaseModel):
    """`name` picks the builder; every other key is one of its keyword options."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    name: str

    @model_validator(mode="after")
    def _known_options(self) -> ModelConfig:
        from bench.models import list_models, model_options

        if self.name not in list_models():
            raise ValueError(f"model.name: unknown model {self.name!r}; known: {', '.join(list_models())}")
        options = model_options(self.name)
        for key, value in (self.model_extra or {}).items():
            if key not in options:
                raise ValueError(f"model.{key}: model {self.name} has no such option; options: {', '.join(options)}")
            expected = options[key]
            ok = isinstance(value, type(expected)) or (isinstance(expected, float) and isinstance(value, int))
            if isinstance(expected, tuple):
                item = type(expected[0]) if expected else object
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(v, item) and not (isinstance(v, bool) and item is not bool) for v in value
                )
            if not ok or (isinstance(value, bool) and not isinstance(expected, bool)):
                kind = (
                    f"a list of {type(expected[0]).__name__}"
                    if isinstance(expected, tuple)
                    else type(expected).__name__
                )
                raise ValueError(f"model.{key} should be {kind}, got {value!r}")
            # Every number a builder takes is a size, a count, a kernel or a rate.
            numbers = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if type(v) in (int, float)]
            if any(not math.isfinite(v) or v < 0 or (type(v) is int and v == 0) for v in numbers) or value in ([], ()):
                raise ValueError(f"model.{key} should be positive (a rate at least 0), got {value!r}")
        return self

    @property
    def options(self) -> dict[str, Any]:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in (self.model_extra or {}).items()}


class DataConfig(Section):
    dataset: Literal["cifar10", "cifar100"]
    source: Literal["official", "embedded"] = "official"
    val_size: int = Field(ge=0)
    split_seed: int = 0
    batch_size: int = Field(gt=0)
    # Evaluation of each image is independent of its batch in eval mode; with eval.mode "train"
    # BatchNorm normalizes by the batch's statistics, so the batch size changes the accuracy.
    eval_batch_size: int = Field(gt=0, json_schema_extra={**NOT_RESULT, "result_when": {"eval.mode": "train"}})
    image_size: int = Field(default=32, ge=8)
    augment: Literal["crop_flip", "resized_crop_flip", "none"] = "crop_flip"
    crop_padding: int = Field(default=4, ge=0)
    mean: tuple[float, float, float] = Field(strict=False)  # TOML gives a list
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(strict=False)


class OptimConfig(Section):
    name: Literal["sgd", "adam"]
    lr: float = Field(gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    nesterov: bool = False


class ScheduleConfig(Section):
    name: Literal["none", "step", "exponential", "cosine"] = "none"
    step_size: int = Field(default=30, gt=0)
    gamma: float = Field(default=0.1, gt=0, le=1)
    eta_min: float = Field(default=0.0, ge=0)
    # True: the schedule starts one step ahead, so epoch k trains at the rate of k steps, not
    # k - 1 (a loop that steps the scheduler before each epoch, as R4's source did).
    step_before_epoch: bool = False


class TrainConfig(Section):
    epochs: int = Field(gt=0)
    # A resumed run continues exactly where its checkpoint left it, so how often it is taken
    # changes nothing that is learned.
    checkpoint_every: int = Field(default=10, gt=0, json_schema_extra=NOT_RESULT)
    # A checkpoint every `checkpoint_every` epochs, but not within this many seconds of the one
    # before (and always after the last epoch or a stop): its cost stays a small share however
    # short the epochs are. 0: every `checkpoint_every` epochs.
    checkpoint_min_interval_s: float = Field(default=60.0, ge=0, json_schema_extra=NOT_RESULT)
    # Deterministic kernels: repeatable numbers, not other ones.
    deterministic: bool = Field(default=True, json_schema_extra=NOT_RESULT)
    # Memory format only: faster convolutions, same model.
    channels_last: bool = Field(default=True, json_schema_extra=NOT_RESULT)
    # bfloat16 autocast on CUDA devices that support it; float32 on the CPU and MPS. A result key:
    # every product is rounded to 8 bits of mantissa, a change in the arithmetic of each step.
    amp: bool = True
    # torch.compile the model; compilation is done before the first epoch and not timed, and the
    # run trains as if uncompiled.
    compile: bool = Field(default=False, json_schema_extra=NOT_RESULT)
    # 0: per-epoch metrics only; N: also train_step_loss, the mean loss of every N steps.
    log_every_steps: int = Field(default=0, ge=0, json_schema_extra=NOT_RESULT)
    # MLflow's system metrics (CPU, memory, disk, network, GPU) sampled on a thread while the run
    # trains, every `system_metrics_interval_s` seconds: what the machine did, not what was learned.
    system_metrics: bool = Field(default=True, json_schema_extra=NOT_RESULT)
    system_metrics_interval_s: float = Field(default=10.0, gt=0, json_schema_extra=NOT_RESULT)


class EvalConfig(Section):
    # "train": BatchNorm batch statistics and dropout on, as in the author's R1 code.
    mode: Literal["eval", "train"] = "eval"
    # True: train_acc re-measured over the augmented train set after each epoch (R1's code);
    # False: the running accuracy of the epoch's training batches.
    remeasure_train_acc: bool = False


class RunConfig(Section):
    experiment: str = Field(json_schema_extra=NOT_RESULT)  # a name; cells and reports keep experiments apart
    seed: int = Field(default=0, ge=0)
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig
    eval: EvalConfig = EvalConfig()

    def flat(self) -> dict[str, Any]:
        return flatten(self.model_dump(mode="json"))

    def params(self) -> dict[str, str]:
        """The flat config as MLflow params: lists and tables as JSON, the rest as str()."""
        return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in sorted(self.flat().items())}

    def result_keys(self) -> list[str]:
        """The dotted keys whose values change what the run learns or measures (seed included),
        sorted; model options all count."""
        flat = self.flat()
        marks = _field_marks(type(self))
        return sorted(k for k in flat if _counts(marks.get(k, {}), flat))

    def result_values(self) -> dict[str, Any]:
        """The result keys with their values as they bear on the run: a weights file by its content."""
        flat = self.flat()
        values = {k: flat[k] for k in self.result_keys()}
        if isinstance(values.get("model.weights"), str):
            values["model.weights"] = weights_identity(values["model.weights"])
        return values

    def config_hash(self) -> str:
        """Identifies what the run learns: its result keys, seed excluded (the seeds of one config
        share it). Settings that change only speed, checkpoints or logging leave it as it is."""
        values = {k: v for k, v in self.result_values().items() if k != "seed"}
        if self.evaluation_draws():
            values.update(EVALUATION_APART)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    def evaluation_draws(self) -> bool:
        """Whether the run's evaluation draws random numbers: train-mode evaluation (dropout) or
        a re-measure over the augmented train set."""
        return self.eval.mode == "train" or self.eval.remeasure_train_acc

    def earlier_hash(self) -> str | None:
        """The hash bench gave this config before `config_hash` counted only the result keys
        (every key, seed excluded, as the config had them then); None where no earlier version
        could have run it (the scheduler stepped before each epoch came after) or ran it otherwise
        (evaluation that draws took training's random numbers then). Runs and checkpoints made
        then are found by it and carried over."""
        flat = {k: v for k, v in self.flat().items() if k not in ("seed", *LATER_KEYS)}
        if flat.pop("schedule.step_before_epoch") or self.evaluation_draws():
            return None
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


# Evaluation passes draw from random streams of their own since this entry joined the hash; before,
# a config whose evaluation draws (`RunConfig.evaluation_draws`) took them from training's streams
# and learned other weights. Its runs from then are another config, never resumed or carried over.
EVALUATION_APART = {"evaluation.random_streams": "own"}

# Keys added after `earlier_hash`'s version, which its hash never held; none changes a result.
LATER_KEYS = ("train.system_metrics", "train.system_metrics_interval_s")


def _field_marks(model: type[BaseModel], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Each field's json_schema_extra by dotted key, through the nested sections."""
    marks: dict[str, dict[str, Any]] = {}
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            marks.update(_field_marks(kind, f"{prefix}{name}."))
        elif isinstance(info.json_schema_extra, dict):
            marks[f"{prefix}{name}"] = info.json_schema_extra
    return marks


def _counts(mark: dict[str, Any], flat: dict[str, Any]) -> bool:
    if mark.get("result", True):
        return True
    when = mark.get("result_when")
    return bool(when) and all(flat.get(k) == v for k, v in when.items())


def imagenet_sha256_prefix() -> str:
    """The first digits of the SHA-256 of torchvision's ImageNet ResNet-18 file, from its name
    (resnet18-f37072fd.pth): what torchvision checks a download against."""
    from bench.models.resnet18_finetune import imagenet_weights_file

    return imagenet_weights_file().stem.rsplit("-", 1)[-1]


def weights_identity(weights: str, imagenet_prefix: str | None = None) -> str:
    """model.weights as what it loads: "imagenet" and "none" as they are; a local file by its
    SHA-256, and as "imagenet" when it is torchvision's ImageNet file (`imagenet_prefix`, by
    default `imagenet_sha256_prefix()`). A missing file stays a path: the run stops at its
    preflight with its own message."""
    path = Path(weights)
    if weights in ("imagenet", "none") or not path.is_file():
        return weights
    st = path.stat()
    digest = _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)
    prefix = imagenet_prefix or imagenet_sha256_prefix()
    return "imagenet" if digest.startswith(prefix) else f"sha256:{digest}"


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, once per version of the file (size and mtime in the key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def set_dotted(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {path}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as a TOML value (numbers, booleans, lists), else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise UserError(f"--set expects key=value with a dotted key such as optim.lr=0.05, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def validate(tree: dict[str, Any], where: str) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = (
            f" (got {err['input']!r})"
            if err["type"] not in ("extra_forbidden", "missing") and not isinstance(err.get("input"), dict)
            else ""
        )
        more = f" and {exc.error_count() - 1} more" if exc.error_count() > 1 else ""
        if msg.startswith(f"{key}."):  # the message names its key already (model options)
            raise UserError(f"{where}: {msg}{more}") from None
        raise UserError(f"{where}: {key}: {msg}{got}{more}") from None


def load(
    experiment: str, *, profile: str, seed: int = 0, sets: list[str] | tuple[str, ...] = (), epochs: int | None = None
) -> RunConfig:
    """The resolved config: experiment file < profile < profile's per-experiment part < --epochs < --set."""
    tree = {k: v for k, v in read_experiment(experiment).items() if k not in DESCRIPTIVE_KEYS}
    prof = read_profile(profile)
    layers = [prof.get("overrides", {}), prof.get("experiments", {}).get(experiment, {}).get("overrides", {})]
    for layer in layers:
        for key, value in flatten(layer).items():
            set_dotted(tree, key, value)
    if epochs is not None:
        set_dotted(tree, "train.epochs", epochs)
    for text in sets:
        key, value = parse_assignment(text)
        if key in ("experiment", "seed"):
            raise UserError(f"--set {key}: not a config value; name experiments as arguments and use --seeds N")
        set_dotted(tree, key, value)
    tree["experiment"] = experiment
    tree["seed"] = seed
    return validate(tree, f"{experiment} (profile {profile})")


def listing() -> str:
    """What `bench list` prints: the experiments, suites, profiles and models there are."""
    from bench.models import list_models

    lines = ["experiments:"]
    lines += [f"  {name:30s} {read_experiment(name).get('title', '')}" for name in list_experiments()]
    lines.append("suites:")
    lines += [f"  {name:30s} {', '.join(exps)}" for name, exps in sorted(read_suites().items())]
    lines.append("profiles:")
    for name in list_profiles():
        prof = read_profile(name)
        lines.append(f"  {name:30s} {prof.get('description', '')} ({process.plural(prof.get('seeds', 1), 'seed')})")
    lines.append("models:")
    lines += [f"  {name}" for name in list_models()]
    return "\n".join(lines)
