"""The report from frames built by hand: summary numbers, verdicts, selection, identical bytes."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench import config, reference, report, results

ALL = ["hw4-resnet-cifar100", "resnet18-finetune-cifar100", "bottleneck-cifar10", "resnetb-cifar10"]
# The runs' config hash "h1" is each experiment's recipe, under this profile and the paper's.
SAME = {name: report.Recipe("h1", {}) for name in ALL}
NO_DIFF = {"recipes": SAME, "paper": SAME}


def record(
    experiment,
    seed,
    test_acc,
    *,
    profile="paper",
    config_hash="h1",
    status="FINISHED",
    start=0,
    complete="true",
    best=None,
    params=None,
    run_id=None,
    val=5000,
    train_time=True,
):
    """A run as `Tracker.read_runs` returns it; test_acc per epoch."""
    epochs = len(test_acc)
    history = {
        "test_acc": list(enumerate(test_acc, 1)),
        "train_loss": [(e, 3.0 / e + seed * 0.01) for e in range(1, epochs + 1)],
        "epoch_time_s": [(e, 2.0) for e in range(1, epochs + 1)],
    }
    if train_time:  # the training pass alone; runs from before it was logged lack it
        history["train_time_s"] = [(e, 1.5) for e in range(1, epochs + 1)]
    if best is not None:
        history["best_test_acc"] = [(epochs, best)]
    return {
        "run_id": run_id or f"{experiment}-{profile}-{config_hash}-{seed}-{start}",
        "run_name": f"{experiment}-{profile}-seed{seed}",
        "status": status,
        "start_time": start,
        "params": {"train.epochs": str(epochs), "data.source": "official", **(params or {})},
        "tags": {
            "bench.experiment": experiment,
            "bench.profile": profile,
            "bench.seed": str(seed),
            "bench.config_hash": config_hash,
            "bench.status": "finished" if status == "FINISHED" else "stopped",
            "bench.epochs_done": str(epochs),
            "bench.best_epoch": str(epochs),
            "bench.device": "NVIDIA H100",
            "bench.git_commit": "0123abc",
            "bench.torch": "2.14.1",
            "bench.python": "3.11.9",
            "bench.data_complete": complete,
            "bench.data_train": str(50000 - val),
            "bench.data_val": str(val),
            "bench.data_test": "10000",
        },
        "history": history,
    }


FINALS = {  # final test accuracy per seed
    "hw4-resnet-cifar100": [0.630, 0.636, 0.628],
    "resnet18-finetune-cifar100": [0.680, 0.690, 0.685],
    "bottleneck-cifar10": [0.900, 0.905, 0.895],
    "resnetb-cifar10": [0.920, 0.930, 0.925],
}


def paper_results(finals=FINALS):
    recs = []
    for name, values in finals.items():
        for seed, v in enumerate(values):
            recs.append(record(name, seed, [v / 2, v], best=v - 0.001))
    return results.frames(recs)


@pytest.fixture
def summary():
    return report.summarize(paper_results(), ALL, suite="all", **NO_DIFF)


def test_summary_numbers_match_scipy(summary):
    rows = {r.experiment: r for r in summary.rows}
    assert list(rows) == ALL
    for name, values in FINALS.items():
        ci = rows[name].final
        low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
        assert (ci.n, ci.mean, ci.low, ci.high) == pytest.approx((3, np.mean(values), low, high))
        assert rows[name].best.mean == pytest.approx(np.mean(values) - 0.001)
        # R1/R2's figure is the whole job's (training and evaluation), R3/R4's the training loop's.
        assert rows[name].seconds_per_epoch == pytest.approx(2.0 if name.startswith(("hw4", "resnet18")) else 1.5)


def test_verdicts_against_the_reported_figures(summary):
    verdicts = {r.experiment: r.verdict for r in summary.rows}
    assert verdicts == {
        "hw4-resnet-cifar100": "reproduced",  # 63.13 % [62.08, 64.19] holds 63.31 %
        "resnet18-finetune-cifar100": "below",  # 68.50 % [67.26, 69.74]; 71.23 % > 69.74 + 1
        "bottleneck-cifar10": "above",  # 90 % against 61.08 %
        "resnetb-cifar10": "above",
    }
    assert all(r.why_not_comparable is None for r in summary.rows)


def test_welch_comparison_matches_scipy(summary):
    ref = sps.ttest_ind(FINALS["bottleneck-cifar10"], FINALS["resnetb-cifar10"], equal_var=False)
    assert (summary.comparison.t, summary.comparison.p) == pytest.approx((ref.statistic, ref.pvalue))
    text = report.markdown(summary, {})
    assert f"p = {ref.pvalue:.4f}" in text and "the two models differ" in text


def test_subset_data_and_other_recipes_are_not_comparable():
    recs = [record("resnetb-cifar10", s, [0.2, 0.67], complete="false") for s in range(2)]
    s = report.summarize(results.frames(recs), ["resnetb-cifar10"], suite="cifar10", **NO_DIFF)
    assert (s.rows[0].verdict, s.rows[0].why_not_comparable) == ("not comparable", "subset of CIFAR")
    # Said at the top, right under the title: a reader sees it before any figure.
    title, first = report.markdown(s, {}).split("\n\n")[:2]
    assert title.startswith("# Report:") and first.startswith(
        "> None of these runs is the reported recipe on the full dataset"
    )
    assert "not comparable to the reported ones" in first
    # A profile whose recipe is not the paper's: its runs are its recipe's, and not comparable.
    recs = [record("resnetb-cifar10", s, [0.2, 0.67], params={"optim.lr": "0.05"}) for s in range(2)]
    mine = {"resnetb-cifar10": report.Recipe("h1", {"optim.lr": "0.05", "train.epochs": "2"})}
    paper = {"resnetb-cifar10": report.Recipe("h0", {"optim.lr": "0.1", "train.epochs": "2"})}
    s = report.summarize(results.frames(recs), ["resnetb-cifar10"], suite="cifar10", recipes=mine, paper=paper)
    assert (s.rows[0].verdict, s.rows[0].why_not_comparable, s.rows[0].recipe_diff) == (
        "not comparable",
        "recipe differs",
        ["optim.lr"],
    )
    assert "differs from the paper recipe in: `optim.lr`" in report.markdown(s, {})


def test_the_recipe_is_the_experiment_under_the_profile_by_its_result_keys():
    paper = report.recipe("resnetb-cifar10", "paper")
    assert paper.params["optim.lr"] == "0.1" and paper.params["train.epochs"] == "100" and "seed" not in paper.params
    assert paper.config_hash == config.load("resnetb-cifar10", profile="paper").config_hash()
    assert "train.compile" not in paper.params and "train.checkpoint_every" not in paper.params
    smoke = report.recipe("resnetb-cifar10", "smoke")
    # The smoke recipe differs in data and budget; its checkpoint interval (non-result) is not listed.
    assert set(report.differing(smoke.params, paper.params)) == {
        "data.batch_size",
        "data.source",
        "data.val_size",
        "optim.lr",
        "train.epochs",
    }


def test_selection_keeps_one_profile_finished_newest_per_seed_by_config():
    recs = [
        record("resnetb-cifar10", 0, [0.5], start=1),
        record("resnetb-cifar10", 0, [0.6], start=5),  # the same cell again: the newest counts
        record("resnetb-cifar10", 1, [0.7], start=2),
        record("resnetb-cifar10", 2, [0.1], start=3, status="RUNNING"),
        record("resnetb-cifar10", 0, [0.9], start=9, config_hash="h2"),  # a --set variant
        record("resnetb-cifar10", 0, [0.3], profile="smoke"),
    ]
    res = results.frames(recs)
    groups, excluded = report.select(res.runs, "resnetb-cifar10", "paper")
    assert sorted(groups) == ["h1", "h2"]
    assert list(groups["h1"].seed) == [0, 1] and list(groups["h1"].final_test_acc) == pytest.approx([0.6, 0.7])
    assert list(groups["h2"].final_test_acc) == pytest.approx([0.9])
    assert excluded == {"other profiles": 1, "not finished": 1}


def test_profile_choice():
    both = results.frames([record("resnetb-cifar10", 0, [0.5], profile="smoke"), record("resnetb-cifar10", 0, [0.5])])
    assert report.choose_profile(both.runs, None) == "paper"
    assert report.choose_profile(both.runs, "smoke") == "smoke"
    smoke = results.frames(
        [record("resnetb-cifar10", s, [0.5], profile=p) for s, p in enumerate(["smoke", "smoke", "tiny"])]
    )
    assert report.choose_profile(smoke.runs, None) == "smoke"


def test_markdown_table_has_every_reported_run_with_both_values(summary):
    text = report.markdown(summary, {"test_acc": "test_acc.png"})
    lines = [l for l in text.splitlines() if l.startswith("| R")]
    assert len(lines) == 4
    hw4 = next(l for l in lines if "hw4-resnet-cifar100" in l)
    assert "63.31 % (100)" in hw4 and "63.52 % (89)" in hw4  # reported final and best
    assert "63.13 % [" in hw4 and "**reproduced**" in hw4 and "-0.18 pt" in hw4
    assert "~108 s (est.) / 2.00 s (training + evaluation)" in hw4 and "NVIDIA H100" in hw4
    resnetb = next(l for l in lines if "resnetb-cifar10" in l)
    assert "149 s / 1.50 s (training pass)" in resnetb
    assert "![Test accuracy against epoch](test_acc.png)" in text


def test_one_seed_has_no_interval():
    s = report.summarize(
        results.frames([record("resnetb-cifar10", 0, [0.66])]), ["resnetb-cifar10"], suite="x", **NO_DIFF
    )
    assert "66.00 % (one seed, no interval)" in report.summary_table(s)
    assert "needs at least two finished seeds" not in report.markdown(s, {})  # no pair, no comparison section


def test_write_gives_identical_bytes_and_links_that_resolve(summary, tmp_path):
    first = report.write(summary, tmp_path / "a")
    second = report.write(report.summarize(paper_results(), ALL, suite="all", **NO_DIFF), tmp_path / "b")
    names = sorted(p.name for p in first.parent.iterdir())
    figures = ["bottleneck_vs_resnet_b.png", "final_test_acc_spread.png", "lr.png", "test_acc.png", "train_loss.png"]
    assert names == sorted(["README.md", "epochs.csv", "reported.csv", "runs.csv", *figures])  # no val_acc: none logged
    for name in names:
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes(), name
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", first.read_text())
    assert sorted(links) == figures
    for link in links:
        assert (first.parent / link).is_file()
    assert (first.parent / "test_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_ignore_the_users_matplotlib_style(summary, tmp_path):
    import matplotlib

    before = report.write(summary, tmp_path / "a").parent / "test_acc.png"
    with matplotlib.rc_context({"lines.linewidth": 7, "axes.facecolor": "red"}):
        after = report.write(summary, tmp_path / "b").parent / "test_acc.png"
    assert before.read_bytes() == after.read_bytes()
    assert matplotlib.rcParams["lines.linewidth"] != 7  # the context restored the user's settings


def test_the_report_modules_do_not_import_mlflow():
    import subprocess
    import sys

    code = "import sys, bench.report, bench.report.figures, bench.stats; print('mlflow' in sys.modules, 'optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_tuning_runs_are_not_counted_as_seeds():
    trial = record("resnetb-cifar10", 0, [0.9], start=9)
    trial["tags"]["bench.kind"] = "trial"
    res = results.frames([record("resnetb-cifar10", 0, [0.5]), trial])
    assert list(res.runs.kind) == ["cell", "trial"]
    groups, _ = report.select(res.runs, "resnetb-cifar10", "paper")
    assert list(groups["h1"].final_test_acc) == [0.5]


# --- the recipe's runs against the reported figures, whatever else is in the store --------------


def _smoke_hash(*sets: str) -> str:
    return config.load("resnetb-cifar10", profile="smoke", sets=list(sets)).config_hash()


def test_the_recipe_runs_are_compared_beside_a_tuned_config_and_a_compiled_rerun():
    """A 2-seed smoke suite, then a tuned config's 2 seeds and seed 0 again with train.compile:
    the recipe's row holds the smoke runs (the compiled one among them, newest of its seed), and
    the tuned config is a row of its own, named by its values."""
    recipe = _smoke_hash()
    tuned_sets = ("optim.lr=0.05", "data.batch_size=64")
    tuned = _smoke_hash(*tuned_sets)
    assert _smoke_hash("train.compile=true") == recipe != tuned
    tuned_params = {"optim.lr": "0.05", "data.batch_size": "64"}
    smoke_params = {k: v for k, v in config.load("resnetb-cifar10", profile="smoke").params().items() if k != "seed"}
    recs = [
        record(
            "resnetb-cifar10",
            s,
            [0.3, 0.40 + s / 100],
            profile="smoke",
            config_hash=recipe,
            params=smoke_params,
            start=s,
            complete="false",
        )
        for s in range(2)
    ]
    recs += [
        record(
            "resnetb-cifar10",
            s,
            [0.3, 0.50 + s / 100],
            profile="smoke",
            config_hash=tuned,
            params={**smoke_params, **tuned_params},
            start=10 + s,
            complete="false",
        )
        for s in range(3)
    ]
    recs.append(
        record(
            "resnetb-cifar10",
            0,
            [0.3, 0.45],
            profile="smoke",
            config_hash=recipe,
            start=20,
            complete="false",
            params={**smoke_params, "train.compile": "True"},
        )
    )
    s = report.summarize(results.frames(recs), ["resnetb-cifar10"], suite="cifar10", profile="smoke")
    main, other = s.rows
    assert main.is_recipe and list(main.runs.final_test_acc) == pytest.approx([0.45, 0.41])
    assert main.why_not_comparable == "subset of CIFAR" and main.final.n == 2
    assert other.label == "data.batch_size=64, optim.lr=0.05" and other.final.n == 3
    assert other.why_not_comparable == "subset of CIFAR"
    text = report.markdown(s, {})
    assert "| R4 ResNet-B, CIFAR-10 (`resnetb-cifar10`) |" in text
    assert "| R4 ResNet-B, CIFAR-10 (`resnetb-cifar10`), other config: data.batch_size=64, optim.lr=0.05 |" in text
    # The runs are listed with their config.
    assert text.count("| recipe |") == 2 and text.count("| data.batch_size=64, optim.lr=0.05 |") == 3


def test_on_the_full_data_the_recipe_gets_a_verdict_and_other_configs_are_labelled():
    paper = report.recipe("resnetb-cifar10", "paper")
    recs = [
        record("resnetb-cifar10", s, [0.5, v], config_hash=paper.config_hash, params=paper.params, start=s)
        for s, v in enumerate([0.66, 0.67])
    ]
    lr = config.load("resnetb-cifar10", profile="paper", sets=["optim.lr=0.05"]).config_hash()
    recs += [
        record(
            "resnetb-cifar10", s, [0.5, 0.9], config_hash=lr, params={**paper.params, "optim.lr": "0.05"}, start=5 + s
        )
        for s in range(3)
    ]
    s = report.summarize(results.frames(recs), ["resnetb-cifar10"], suite="cifar10")
    assert [(r.label, r.verdict, r.why_not_comparable) for r in s.rows] == [
        (None, "reproduced", None),
        ("optim.lr=0.05", "not comparable", "another config"),
    ]
    assert "Other configs, in rows of their own: `optim.lr=0.05`" in report.markdown(s, {})


def test_recipe_runs_made_before_the_hash_counted_only_result_keys_are_the_recipes():
    """A store written by an earlier bench: its recipe runs carry the hash of every key. They are
    the recipe's row, a seed run under both hashes counted once (the newest)."""
    mine = {"resnetb-cifar10": report.Recipe("new", {}, earlier_hash="old")}
    recs = [
        record("resnetb-cifar10", s, [0.5, v], config_hash="old", start=s) for s, v in enumerate([0.60, 0.62, 0.64])
    ]
    recs.append(record("resnetb-cifar10", 2, [0.5, 0.70], config_hash="new", start=10))
    recs.append(record("resnetb-cifar10", 0, [0.5, 0.90], config_hash="other", start=11, params={"optim.lr": "0.05"}))
    s = report.summarize(results.frames(recs), ["resnetb-cifar10"], suite="cifar10", recipes=mine, paper=mine)
    recipe_row, other = s.rows
    assert recipe_row.is_recipe and list(recipe_row.runs.seed) == [0, 1, 2]
    assert list(recipe_row.runs.final_test_acc) == [0.60, 0.62, 0.70]
    assert not other.is_recipe and list(other.runs.final_test_acc) == [0.90]


def test_runs_trained_without_a_validation_split_compare_on_the_final_test_accuracy():
    """R1 and R2 train on all 50k images (data.val_size = 0): no val_acc, no best checkpoint."""
    recs = [record("hw4-resnet-cifar100", s, [0.3] * 99 + [v], val=0) for s, v in enumerate([0.630, 0.636, 0.628])]
    for rec in recs:
        del rec["tags"]["bench.best_epoch"]
    s = report.summarize(results.frames(recs), ["hw4-resnet-cifar100"], suite="x", **NO_DIFF)
    [row] = s.rows
    assert row.best.n == 0 and row.verdict == "reproduced"  # 63.13 % [62.10, 64.17] holds 63.31 % at epoch 100
    text = report.markdown(s, {})
    assert "nan" not in text.lower()
    line = next(l for l in text.splitlines() if l.startswith("| R1"))
    assert (
        "63.13 % [62.10, 64.17]" in line
        and "- (no validation split)" in line
        and "(50000/0/10000 train/val/test)" in line
    )
    assert "no validation split, so no val-chosen best" in text


def test_seconds_per_epoch_compare_the_training_pass_and_say_when_it_was_not_logged():
    recs = [record("resnetb-cifar10", s, [0.66], train_time=False) for s in range(2)]
    s = report.summarize(results.frames(recs), ["resnetb-cifar10"], suite="x", **NO_DIFF)
    assert s.rows[0].seconds_per_epoch is None  # not epoch_time_s: that one includes evaluation
    assert "149 s / - (no train_time_s logged) (training pass)" in report.summary_table(s)


def test_an_interval_past_0_percent_is_cut_there_and_says_so():
    recs = [record("resnetb-cifar10", s, [v]) for s, v in enumerate([0.02, 0.0666])]
    s = report.summarize(results.frames(recs), ["resnetb-cifar10"], suite="x", **NO_DIFF)
    [row] = s.rows
    assert row.final.low == 0.0 and row.final.clipped
    assert "4.33 % [0.00, 33.94] (t interval cut at the bound)" in report.summary_table(s)
    assert row.verdict == "below"  # 66.97 % lies above the printed interval's 33.94 % + 1 point


# --- the exports: what a pandas user rebuilds the report from ------------------------------------


def _store_with_everything():
    """The paper suite, another config of R4, and runs the report leaves out."""
    recs = [
        record(name, seed, [v / 2, v], best=v - 0.001)
        for name, values in FINALS.items()
        for seed, v in enumerate(values)
    ]
    recs += [
        record("resnetb-cifar10", s, [0.4, v], config_hash="h2", params={"optim.lr": "0.05"}, start=5)
        for s, v in enumerate([0.91, 0.94])
    ]
    recs.append(record("resnetb-cifar10", 0, [0.3], profile="smoke"))
    recs.append(record("resnetb-cifar10", 3, [0.3], status="RUNNING"))
    for rec in recs:
        rec["history"]["lr"] = [(e, 0.1 / e) for e in range(1, len(rec["history"]["test_acc"]) + 1)]
        rec["history"]["val_acc"] = [(e, v - 0.01) for e, v in rec["history"]["test_acc"]]
    return results.frames(recs)


def _summary_cells(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """The summary table of the markdown: {(experiment, row): {column: cell}}."""
    lines = text.split("## Did it reproduce?")[1].split("\n\n")[1].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        name = re.match(r".*\(`([^`]+)`\)(?:, other config: (.*))?$", cells["reported run"])
        out[(name.group(1), name.group(2) or "recipe")] = cells
    return out


def test_the_summary_table_is_rebuilt_from_runs_csv_alone(tmp_path):
    summary = report.summarize(_store_with_everything(), ALL, suite="all", **NO_DIFF)
    shown = _summary_cells(report.write(summary, tmp_path).read_text())
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert len(runs) == 12 + 2 + 2 and runs.report_row.isna().sum() == 2  # every run; the left-out ones in no row
    rebuilt = {}
    for (experiment, row), g in runs.dropna(subset=["report_row"]).groupby(["experiment", "report_row"]):
        acc = g.final_test_acc
        low, high = sps.t.interval(0.95, len(acc) - 1, loc=acc.mean(), scale=sps.sem(acc))
        cut = " (t interval cut at the bound)" if low < 0 or high > 1 else ""
        rebuilt[(experiment, row)] = {
            "suite final, mean [95 % CI]": f"{100 * acc.mean():.2f} % [{100 * max(low, 0):.2f}, {100 * min(high, 1):.2f}]{cut}",
            "seeds": str(len(g)),
            "sd over seeds": f"{100 * acc.std():.2f} pt",
            "device-hours per seed": f"{g.total_epoch_time_s.mean() / 3600:.3g} h",
            "parameters": f"{g.model_parameters.iloc[0] / 1e6:.2f} M",
            "GFLOPs per image": f"{g.gflops_per_image.iloc[0]:.3g}",
        }
    assert set(rebuilt) == set(shown) and ("resnetb-cifar10", "config h2") in rebuilt
    for key, cells in rebuilt.items():
        assert {c: shown[key][c] for c in cells} == cells, key
    # The model's cost is the config's: counted on the model that `bench run` builds.
    from bench.models import count_parameters, create_model

    hw4 = config.load("hw4-resnet-cifar100", profile="paper")
    model = create_model(hw4.model.name, num_classes=100, **hw4.model.options)
    assert runs[runs.experiment == "hw4-resnet-cifar100"].model_parameters.iloc[0] == count_parameters(model)


def test_epochs_csv_has_one_row_per_run_and_epoch_with_every_metric(tmp_path):
    res = _store_with_everything()
    report.write(report.summarize(res, ALL, suite="all", **NO_DIFF), tmp_path)
    epochs = pd.read_csv(tmp_path / "epochs.csv")
    assert list(epochs.columns) == [
        *results.RUN_KEYS,
        "epoch",
        "epoch_time_s",
        "lr",
        "test_acc",
        "train_loss",
        "train_time_s",
        "val_acc",
    ]
    assert len(epochs) == len(res.metrics[res.metrics.metric == "test_acc"])
    one = epochs[epochs.run_id == res.runs.run_id.iloc[0]]
    assert list(one.epoch) == [1, 2] and list(one.lr) == pytest.approx([0.1, 0.05])
    reported = pd.read_csv(tmp_path / "reported.csv")
    assert set(reported.experiment) == set(ALL) and list(reported.columns) == list(reference.CURVE_COLUMNS)


def test_val_acc_and_lr_figures_are_drawn_when_logged(tmp_path):
    text = report.write(report.summarize(_store_with_everything(), ALL, suite="all", **NO_DIFF), tmp_path).read_text()
    assert (
        "![Validation accuracy against epoch](val_acc.png)" in text and "![Learning rate against epoch](lr.png)" in text
    )
    assert "![Final test accuracy per seed and config](final_test_acc_spread.png)" in text


def test_other_configs_that_change_the_model_are_counted_on_their_own_model():
    from bench.models import cost

    base = report.recipe("resnetb-cifar10", "smoke")
    tiny = {"model.widths": "[4, 8, 8]", "model.blocks_per_stage": "1", "model.stem_width": "4"}
    recs = [
        record("resnetb-cifar10", s, [0.3], profile="smoke", config_hash=h, params={**base.params, **p}, start=s)
        for s, (h, p) in enumerate(
            [
                (base.config_hash, {}),
                ("tiny", tiny),
                ("lr", {"optim.lr": "0.5"}),
                ("gone", {"model.widths": "not a list"}),
            ]
        )
    ]
    s = report.summarize(results.frames(recs), ["resnetb-cifar10"], suite="x", profile="smoke")
    costs = {r.label or "recipe": r.cost for r in s.rows}
    smoke = cost.of_config(config.load("resnetb-cifar10", profile="smoke"))
    assert costs["recipe"] == smoke and costs["optim.lr=0.5"] == smoke  # the learning rate changes no model
    sets = [f"{k}={v}" for k, v in tiny.items()]
    assert (
        costs["model.blocks_per_stage=1, model.stem_width=4, model.widths=[4, 8, 8]"]
        == cost.of_config(config.load("resnetb-cifar10", profile="smoke", sets=sets))
        != smoke
    )
    assert costs["model.widths=not a list"] is None  # values that no longer make a config: "-"
    line = next(l for l in report.summary_table(s).splitlines() if "not a list" in l)
    assert "| - | - |" in line
    # A bool option is logged as Python's True and read back as TOML's true.
    ft = report.recipe("resnet18-finetune-cifar100", "smoke")
    runs = results.frames(
        [
            record(
                "resnet18-finetune-cifar100",
                0,
                [0.3],
                profile="smoke",
                config_hash="f",
                params={**ft.params, "model.freeze_backbone": "True"},
            )
        ]
    ).runs
    frozen = report.summary.variant_cost(runs, "resnet18-finetune-cifar100", "smoke", ft, None)
    assert frozen == cost.of_config(
        config.load("resnet18-finetune-cifar100", profile="smoke", sets=["model.freeze_backbone=true"])
    )
