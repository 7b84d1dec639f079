"""Which cells a suite runs: (experiment x seed x ablation variant) configs, loaded and validated,
a shard of them, and the preflight that finds whatever can be wrong before the first one trains
(configs, data, weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from bench import ablation, config, data
from bench.data import cifar
from bench.errors import UserError, reason
from bench.models import create_model


@dataclass(frozen=True)
class Cell:
    profile: str
    cfg: config.RunConfig
    # The ablation variant the cell trains (`bench run --ablate`): shown and tagged, not part of
    # its identity, so a config trained before, or both as a variant and by --set, is one cell.
    ablation: str | None = None

    @property
    def experiment(self) -> str:
        return self.cfg.experiment

    @property
    def name(self) -> str:
        return f"{self.experiment}/{self.profile}/seed{self.cfg.seed}"

    @property
    def variant(self) -> str | None:
        """The ablation variant it trains, where that is not the recipe."""
        return self.ablation if self.ablation not in (None, ablation.RECIPE) else None

    @property
    def display(self) -> str:
        return self.name + (f" ({self.variant})" if self.variant else "")

    @property
    def run_name(self) -> str:
        """Two configs of one experiment and profile differ in the UI by their hash's first digits;
        the seeds of one config share everything before `-seed`."""
        return f"{self.experiment}-{self.profile}-{self.cfg.config_hash()[:8]}-seed{self.cfg.seed}"

    @property
    def description(self) -> str:
        """The run's description in the MLflow UI (markdown): the experiment's, then the cell's."""
        about = config.read_profile(self.profile).get("description")
        profile = f"profile `{self.profile}`" + (f" ({about})" if about else "")
        variant = f", ablation `{self.ablation}`" if self.ablation else ""
        return f"{config.about_markdown(self.experiment)}\n**This run:** {profile}, seed {self.cfg.seed}, config `{self.cfg.config_hash()}`{variant}\n"

    @property
    def key(self) -> str:
        """Names the cell in its lease: what its tags say, in one string."""
        return f"{self.name}/{self.cfg.config_hash()}"

    @property
    def tags(self) -> dict[str, str]:
        return {
            "bench.experiment": self.experiment,
            "bench.profile": self.profile,
            "bench.seed": str(self.cfg.seed),
            "bench.config_hash": self.cfg.config_hash(),
        }

    @property
    def run_tags(self) -> dict[str, str]:
        """The tags a run of the cell carries: its identity and the ablation variant it trains."""
        return {**self.tags, **({ABLATION_TAG: self.ablation} if self.ablation else {})}

    def checkpoint_dir(self, root: Path) -> Path:
        return Path(root) / self.experiment / f"{self.profile}-seed{self.cfg.seed}-{self.cfg.config_hash()}"


ABLATION_TAG = "bench.ablation"


def plan(
    experiments: list[str],
    *,
    profile: str,
    seeds: int,
    sets: list[str] = (),
    epochs: int | None = None,
    ablate: bool = False,
) -> list[Cell]:
    """Every cell's config, loaded and validated before anything runs. With `ablate`, each
    experiment's trained ablation variants too (the recipe first), seeds within each variant; a
    variant that trains the same config as one before it is that cell."""
    if not ablate:
        return [
            Cell(profile, config.load(name, profile=profile, seed=seed, sets=sets, epochs=epochs))
            for name in experiments
            for seed in range(seeds)
        ]
    cells = []
    for name in experiments:
        for v in ablation.variants(name, profile):
            if v.kind == ablation.TRAINED and v.same_as is None:
                cells += [
                    Cell(profile, config.load(name, profile=profile, seed=seed, sets=list(v.sets)), v.name)
                    for seed in range(seeds)
                ]
    return cells


def shard(cells: list[Cell], spec: str | None) -> list[Cell]:
    """The cells of shard I of N ("I/N", 1 <= I <= N): every N-th cell from the I-th, so N
    processes or machines given 1/N .. N/N cover every cell exactly once."""
    if spec is None:
        return cells
    index, count = parse_shard(spec)
    return cells[index - 1 :: count]


def parse_shard(spec: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise UserError(f"--shard must be I/N, e.g. 1/4, got {spec!r}") from None
    if not 1 <= index <= count:
        raise UserError(f"--shard I/N needs 1 <= I <= N, got {spec!r}")
    return index, count


def data_root(cfg: config.RunConfig, data_dir: Path | None) -> Path | None:
    return None if cfg.data.source == "embedded" else Path(data_dir or "data")


@cache
def _files(dataset: str, root: Path | None) -> cifar.CifarFiles:
    return cifar.load_cifar(dataset, root)


def files_for(cfg: config.RunConfig, data_dir: Path | None) -> cifar.CifarFiles:
    return _files(cfg.data.dataset, data_root(cfg, data_dir))


def preflight(cells: list[Cell], data_dir: Path | None) -> None:
    """Load each dataset and build each model once: missing data or weights stop before training."""
    for c in cells:
        try:
            data.check_val_size(c.cfg.data.val_size, len(_files(c.cfg.data.dataset, data_root(c.cfg, data_dir)).train))
        except UserError as exc:
            variant = f" (ablation {c.variant})" if c.variant else ""
            raise UserError(f"{c.experiment}{variant}: {exc}") from None
    for cfg in {repr(c.cfg.model) + str(c.cfg.data.image_size): c.cfg for c in cells}.values():
        try:
            model = create_model(
                cfg.model.name, num_classes=cifar.NUM_CLASSES[cfg.data.dataset], **cfg.model.options
            ).eval()
            with torch.no_grad():  # options that build but do not fit together fail on the first batch
                model(torch.zeros(1, 3, cfg.data.image_size, cfg.data.image_size))
        except UserError:
            raise
        except Exception as exc:  # a builder given options that do not fit together (list lengths, ...)
            options = ", ".join(f"model.{k}={v}" for k, v in cfg.model.options.items())
            raise UserError(
                f"{cfg.experiment}: model {cfg.model.name} does not work with {options} at {cfg.data.image_size} px: {reason(exc)}"
            ) from None
