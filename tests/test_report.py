"""The report from frames built by hand: summary numbers, verdicts, selection, identical bytes."""

from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import stats as sps

from bench import report, results

ALL = ["hw4-resnet-cifar100", "resnet18-finetune-cifar100", "bottleneck-cifar10", "resnetb-cifar10"]
NO_DIFF = {name: {} for name in ALL}  # every run counts as the paper recipe


def record(experiment, seed, test_acc, *, profile="paper", config_hash="h1", status="FINISHED", start=0,
           complete="true", best=None, params=None, run_id=None):
    """A run as `Tracker.read_runs` returns it; test_acc per epoch."""
    epochs = len(test_acc)
    history = {
        "test_acc": list(enumerate(test_acc, 1)),
        "train_loss": [(e, 3.0 / e + seed * 0.01) for e in range(1, epochs + 1)],
        "epoch_time_s": [(e, 2.0) for e in range(1, epochs + 1)],
    }
    if best is not None:
        history["best_test_acc"] = [(epochs, best)]
    return {
        "run_id": run_id or f"{experiment}-{profile}-{config_hash}-{seed}-{start}",
        "run_name": f"{experiment}-{profile}-seed{seed}",
        "status": status,
        "start_time": start,
        "params": {"train.epochs": str(epochs), "data.source": "official", **(params or {})},
        "tags": {
            "bench.experiment": experiment, "bench.profile": profile, "bench.seed": str(seed),
            "bench.config_hash": config_hash, "bench.status": "finished" if status == "FINISHED" else "stopped",
            "bench.epochs_done": str(epochs), "bench.best_epoch": str(epochs), "bench.device": "NVIDIA H100",
            "bench.git_commit": "0123abc", "bench.torch": "2.14.1", "bench.python": "3.11.9",
            "bench.data_complete": complete, "bench.data_train": "45000", "bench.data_val": "5000", "bench.data_test": "10000",
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
    return report.summarize(paper_results(), ALL, suite="all", recipes=NO_DIFF)


def test_summary_numbers_match_scipy(summary):
    rows = {r.experiment: r for r in summary.rows}
    assert list(rows) == ALL
    for name, values in FINALS.items():
        ci = rows[name].final
        low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
        assert (ci.n, ci.mean, ci.low, ci.high) == pytest.approx((3, np.mean(values), low, high))
        assert rows[name].best.mean == pytest.approx(np.mean(values) - 0.001)
        assert rows[name].seconds_per_epoch == pytest.approx(2.0)


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
    s = report.summarize(results.frames(recs), ["resnetb-cifar10"], suite="cifar10", recipes=NO_DIFF)
    assert (s.rows[0].verdict, s.rows[0].why_not_comparable) == ("not comparable", "subset of CIFAR")
    recs = [record("resnetb-cifar10", s, [0.2, 0.67], params={"optim.lr": "0.05"}) for s in range(2)]
    recipe = {"resnetb-cifar10": {"optim.lr": "0.1", "train.epochs": "2", "data.source": "official"}}
    s = report.summarize(results.frames(recs), ["resnetb-cifar10"], suite="cifar10", recipes=recipe)
    assert (s.rows[0].verdict, s.rows[0].recipe_diff) == ("not comparable", ["optim.lr"])
    assert "differ from the paper recipe in: `optim.lr`" in report.markdown(s, {})


def test_the_paper_recipe_check_uses_the_experiment_files():
    # A smoke run differs from the paper recipe in its data source, sizes and epochs at least.
    recipe = report.paper_recipe("resnetb-cifar10")
    assert recipe["optim.lr"] == "0.1" and recipe["train.epochs"] == "100" and "seed" not in recipe


def test_selection_keeps_one_profile_one_config_finished_newest_per_seed():
    recs = [
        record("resnetb-cifar10", 0, [0.5], start=1),
        record("resnetb-cifar10", 0, [0.6], start=5),  # the same cell again: the newest counts
        record("resnetb-cifar10", 1, [0.7], start=2),
        record("resnetb-cifar10", 2, [0.1], start=3, status="RUNNING"),
        record("resnetb-cifar10", 0, [0.9], start=9, config_hash="h2"),  # a --set variant
        record("resnetb-cifar10", 0, [0.3], profile="smoke"),
    ]
    res = results.frames(recs)
    picked, excluded = report.select(res.runs, "resnetb-cifar10", "paper")
    assert list(picked.seed) == [0, 1] and list(picked.final_test_acc) == pytest.approx([0.6, 0.7])
    assert excluded == {"other profiles": 1, "not finished": 1, "other configs": 1}


def test_profile_choice():
    both = results.frames([record("resnetb-cifar10", 0, [0.5], profile="smoke"), record("resnetb-cifar10", 0, [0.5])])
    assert report.choose_profile(both.runs, None) == "paper"
    assert report.choose_profile(both.runs, "smoke") == "smoke"
    smoke = results.frames([record("resnetb-cifar10", s, [0.5], profile=p) for s, p in enumerate(["smoke", "smoke", "tiny"])])
    assert report.choose_profile(smoke.runs, None) == "smoke"


def test_markdown_table_has_every_reported_run_with_both_values(summary):
    text = report.markdown(summary, {"test_acc": "test_acc.png"})
    lines = [l for l in text.splitlines() if l.startswith("| R")]
    assert len(lines) == 4
    hw4 = next(l for l in lines if "hw4-resnet-cifar100" in l)
    assert "63.31 % (100)" in hw4 and "63.52 % (89)" in hw4  # reported final and best
    assert "63.13 % [" in hw4 and "**reproduced**" in hw4 and "-0.18 pt" in hw4
    assert "~108 s (est.) / 2.00 s" in hw4 and "NVIDIA H100" in hw4
    assert "![Test accuracy against epoch](test_acc.png)" in text


def test_one_seed_has_no_interval():
    s = report.summarize(results.frames([record("resnetb-cifar10", 0, [0.66])]), ["resnetb-cifar10"], suite="x", recipes=NO_DIFF)
    assert "66.00 % (one seed, no interval)" in report.summary_table(s)
    assert "needs at least two finished seeds" not in report.markdown(s, {})  # no pair, no comparison section


def test_write_gives_identical_bytes_and_links_that_resolve(summary, tmp_path):
    first = report.write(summary, tmp_path / "a")
    second = report.write(report.summarize(paper_results(), ALL, suite="all", recipes=NO_DIFF), tmp_path / "b")
    names = sorted(p.name for p in first.parent.iterdir())
    assert names == ["README.md", "bottleneck_vs_resnet_b.png", "test_acc.png", "train_loss.png"]
    for name in names:
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes(), name
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", first.read_text())
    assert sorted(links) == ["bottleneck_vs_resnet_b.png", "test_acc.png", "train_loss.png"]
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
    picked, _ = report.select(res.runs, "resnetb-cifar10", "paper")
    assert list(picked.final_test_acc) == [0.5]
