"""The ablation tables from frames built by hand: numbers against scipy, rows, the sentence under
each table, the figure and CSV bytes, and the link to a study tuned on an ablation's config."""

from __future__ import annotations

import re

import numpy as np
import optuna
import pandas as pd
import pytest
from scipy import stats as sps

from bench import ablation, config, report, results, stats
from bench.report import ablations
from bench.report import studies as study_section
from tests.test_report import record

HW4 = "hw4-resnet-cifar100"
REPORTED = 0.6331  # R1's final test accuracy (experiments/reference/)
SAME = {
    "recipes": {HW4: report.Recipe("h1", {"model.post_add_relu": "False"})},
    "paper": {HW4: report.Recipe("h1", {"model.post_add_relu": "False"})},
}


def _ablation(name, values, kind="standard", evaluation_only=False):
    return ablation.Ablation(name, values, kind, f"{name}'s source", evaluation_only)


EVAL = _ablation("eval-mode", {"eval.mode": "eval"}, evaluation_only=True)
REMEASURE = _ablation("running-train-acc", {"eval.remeasure_train_acc": False}, evaluation_only=True)
RELU = _ablation("post-add-relu", {"model.post_add_relu": True})
LR = _ablation("lr-0.1", {"optim.lr": 0.1}, kind="reported")


def _variant(a, config_hash, kind=ablation.TRAINED, same_as=None):
    return ablation.Variant(
        a.name, kind, tuple(a.sets), a.label, f"{ablation.KINDS[a.kind]}: {a.source}", config_hash, a, same_as
    )


VARIANTS = {
    HW4: [
        ablation.Variant(ablation.RECIPE, ablation.TRAINED, (), "-", "the reported recipe", "h1"),
        _variant(EVAL, "h1", ablation.EVALUATION_ONLY),
        _variant(REMEASURE, "h1", ablation.EVALUATION_ONLY),
        _variant(RELU, "h2"),
        _variant(LR, "h3"),
        ablation.Variant(
            ablation.ALL_STANDARD,
            ablation.TRAINED,
            ("model.post_add_relu=true",),
            "model.post_add_relu=True",
            "every standard value above, together",
            "h2",
            None,
            "post-add-relu",
        ),
    ]
}
RECIPE_FINALS = [0.470, 0.480, 0.490]
EVAL_FINALS = [0.490, 0.505, 0.512]  # the same weights measured in eval mode
TRAIN, RUNNING = [0.60, 0.62, 0.61], [0.55, 0.58, 0.555]
RELU_FINALS = [0.500, 0.520, 0.510]


def hw4_records(recipe=RECIPE_FINALS, evals=EVAL_FINALS, relu=RELU_FINALS, complete="true"):
    recs = []
    for s, v in enumerate(recipe):
        rec = record(HW4, s, [v / 2, v], complete=complete, val=0, params={"model.post_add_relu": "False"})
        if evals is not None:
            rec["history"]["test_acc/eval.mode-eval"] = [(1, v / 2), (2, evals[s])]
            rec["history"]["train_acc"] = [(2, TRAIN[s])]
            rec["history"]["train_acc/eval.remeasure_train_acc-false"] = [(2, RUNNING[s])]
        recs.append(rec)
    recs += [
        record(
            HW4,
            s,
            [v / 2, v],
            config_hash="h2",
            complete=complete,
            val=0,
            start=10,
            params={"model.post_add_relu": "True"},
        )
        for s, v in enumerate(relu)
    ]
    return recs


def _summary(recs, **kw):
    return report.summarize(results.frames(recs), [HW4], suite="x", **{"variants": VARIANTS, **SAME, **kw})


@pytest.fixture
def table():
    s = _summary(hw4_records())
    found = ablations.tables(s)
    assert [t.experiment for t in found] == [HW4]
    return found[0]


def lines_of(t):
    return {line.variant: line for line in t.lines}


def test_rows_in_order_with_the_reported_reference_second(table):
    assert [l.variant for l in table.lines] == [
        "recipe",
        "reported",
        "eval-mode",
        "running-train-acc",
        "post-add-relu",
        "lr-0.1",
        "all-standard",
    ]
    assert table.shown and table.reported == pytest.approx(REPORTED)
    kinds = {l.variant: l.kind for l in table.lines}
    assert kinds == {
        "recipe": "reference",
        "reported": "reference",
        "eval-mode": "evaluation only, standard value",
        "running-train-acc": "evaluation only, standard value",
        "post-add-relu": "trained, standard value",
        "lr-0.1": "trained, another value the sources report",
        "all-standard": "trained, standard value",
    }


def test_evaluation_only_variants_are_paired_on_the_recipe_runs(table):
    line = lines_of(table)["eval-mode"]
    ref = sps.ttest_rel(EVAL_FINALS, RECIPE_FINALS)
    ci = ref.confidence_interval(0.95)
    d = line.difference
    assert (d.test, d.n_a, d.mean, d.p) == (
        "paired t",
        3,
        pytest.approx(np.mean(EVAL_FINALS) - np.mean(RECIPE_FINALS)),
        pytest.approx(ref.pvalue),
    )
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high))
    assert line.interval.mean == pytest.approx(np.mean(EVAL_FINALS)) and line.metric == "test_acc"
    assert line.verdict == stats.effect_verdict(d) and line.verdict.startswith("raises test accuracy by 2.2 pt [")
    # The re-measure switch compares train accuracy, measured both ways on the same runs.
    running = lines_of(table)["running-train-acc"]
    assert running.metric == "train_acc"
    assert running.difference.p == pytest.approx(sps.ttest_rel(RUNNING, TRAIN).pvalue)
    assert running.verdict.startswith("lowers train accuracy by 4.8 pt [")


def test_trained_variants_against_the_recipe_by_welch(table):
    line = lines_of(table)["post-add-relu"]
    ref = sps.ttest_ind(RELU_FINALS, RECIPE_FINALS, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert (line.difference.test, line.difference.p) == ("Welch's t", pytest.approx(ref.pvalue))
    assert (line.difference.low, line.difference.high) == pytest.approx((ci.low, ci.high))
    assert line.verdict == stats.effect_verdict(line.difference)
    assert lines_of(table)["lr-0.1"].verdict == f"not run: `bench run {HW4} --ablate --profile paper`"
    same = lines_of(table)["all-standard"]
    assert same.verdict.startswith("same config as post-add-relu; ") and same.difference.p == pytest.approx(ref.pvalue)


def test_the_markdown_table_and_the_sentence_under_it(table):
    text = ablations.markdown([table], {HW4: f"ablation-{HW4}.png"})
    assert text.startswith("## Ablations\n")
    rows = {l.split(" | ")[0].lstrip("| "): l for l in text.splitlines() if l.startswith("| ") and "---" not in l}
    assert "48.00 % [" in rows["**recipe**"] and "| reference |" in rows["**recipe**"]
    assert "| 63.31 % | +15.31 pt |" in rows["reported"]
    assert "(paired t)" in rows["eval-mode"] and "(Welch's t)" in rows["post-add-relu"]
    assert (
        "| 0 | test_acc | - | - | - | not run: `bench run hw4-resnet-cifar100 --ablate --profile paper` |"
        in rows["lr-0.1"]
    )
    d = lines_of(table)["eval-mode"].difference
    relu = lines_of(table)["post-add-relu"].difference
    assert (
        f"The recipe is 15.3 pt below the reported 63.31 %; eval-mode closes {stats.points(d.mean)} pt "
        f"[{stats.points(d.low)}, {stats.points(d.high)}] of it"
    ) in table.sentence
    assert f"post-add-relu closes {stats.points(relu.mean)} pt [" in table.sentence
    assert table.sentence.endswith("of it; no variant reaches it.") and "all-standard" not in table.sentence
    assert f"![Ablation of {HW4}: differences from the recipe](ablation-{HW4}.png)" in text


def test_the_sentence_at_its_edges():
    # The recipe already holds the reported figure.
    t = ablations.tables(_summary(hw4_records(recipe=[0.630, 0.636, 0.628], evals=[0.64, 0.64, 0.64])))[0]
    assert t.sentence == "The recipe already reproduces the reported 63.31 %."
    # A variant whose interval holds it reproduces it.
    t = ablations.tables(_summary(hw4_records(relu=[0.625, 0.640, 0.633])))[0]
    assert t.sentence.endswith(
        "; post-add-relu (n = 3) reproduces it (within 1 pt of its interval)."
    )  # all-standard, its config again, counts once
    # Nothing moves toward it at n = 3: no variant's interval excludes zero in its direction.
    t = ablations.tables(_summary(hw4_records(evals=[0.46, 0.49, 0.485], relu=[0.47, 0.49, 0.475])))[0]
    assert t.sentence == (
        "The recipe is 15.3 pt below the reported 63.31 %; no variant moves toward it at n = 3; "
        "1 of 5 variants not run yet; no variant reaches it."
    )
    # A subset of CIFAR (the smoke profile) is not comparable.
    t = ablations.tables(_summary(hw4_records(complete="false")))[0]
    assert t.sentence.startswith("Profile `paper` is not the reported recipe on the full dataset (subset of CIFAR)")
    assert "not comparable to the reported 63.31 %" in t.sentence


def test_runs_without_the_extra_measure_are_left_out_of_the_pair():
    recs = hw4_records()
    for h in ("test_acc/eval.mode-eval", "train_acc/eval.remeasure_train_acc-false"):
        del recs[0]["history"][h]  # seed 0 from a bench that did not measure it
    line = lines_of(ablations.tables(_summary(recs))[0])["eval-mode"]
    assert line.difference.n_a == 2
    assert line.difference.p == pytest.approx(sps.ttest_rel(EVAL_FINALS[1:], RECIPE_FINALS[1:]).pvalue)


def test_no_table_without_figures_beyond_the_recipe():
    t = ablations.tables(_summary(hw4_records(evals=None, relu=[])))[0]
    assert not t.shown
    assert (
        lines_of(t)["eval-mode"].verdict
        == "not measured: the recipe's runs do not log `test_acc/eval.mode-eval` (an older bench)"
    )
    assert ablations.markdown([t], {}) == ""
    t = ablations.tables(_summary(hw4_records(recipe=[], relu=[])))[0]
    assert lines_of(t)["eval-mode"].verdict == f"not run: `bench run {HW4} --ablate --profile paper`"
    assert (
        t.sentence
        == "The recipe has no finished runs of profile `paper`: nothing to compare with the reported 63.31 % yet."
    )
    t = ablations.tables(_summary(hw4_records(recipe=[])))[0]  # the variant ran, the recipe did not
    assert t.shown and lines_of(t)["post-add-relu"].verdict == "no recipe runs to compare with"
    assert lines_of(t)["post-add-relu"].interval.n == 3


def test_a_variant_that_trains_the_recipes_config_is_the_recipe():
    same = ablation.Variant(
        "val-split",
        ablation.TRAINED,
        ("data.val_size=0",),
        "data.val_size=0",
        "s",
        "h1",
        VARIANTS[HW4][4].ablation,
        "recipe",
    )
    t = ablations.tables(_summary(hw4_records(evals=None, relu=[]), variants={HW4: [VARIANTS[HW4][0], same]}))[0]
    line = lines_of(t)["val-split"]
    assert (line.verdict, line.difference, line.interval.n) == (
        "trains the recipe's config: its runs are the recipe's",
        None,
        3,
    )
    assert not t.shown  # nothing beyond the recipe's own figures
    assert ablations.markdown([t], {}) == ""


def test_an_ablations_runs_are_named_by_it_in_the_summary_table():
    s = _summary(hw4_records())
    assert [r.label for r in s.rows] == [None, "ablation post-add-relu: model.post_add_relu=true"]
    assert "other config: ablation post-add-relu: model.post_add_relu=true" in report.summary_table(s)


def test_the_variants_of_the_experiment_files_are_read_by_default():
    recipe = config.load(HW4, profile="paper")
    mine = report.Recipe(recipe.config_hash(), {})
    s = report.summarize(results.frames(hw4_records()), [HW4], suite="x", recipes={HW4: mine}, paper={HW4: mine})
    assert [v.name for v in s.ablations[HW4]] == [v.name for v in ablation.variants(HW4, "paper")]


def test_write_draws_the_figure_and_exports_the_numbers_with_identical_bytes(tmp_path):
    paths = [report.write(_summary(hw4_records()), tmp_path / d) for d in ("a", "b")]
    first = paths[0].parent
    assert {"ablations.csv", f"ablation-{HW4}.png"} <= {p.name for p in first.iterdir()}
    for p in first.iterdir():
        assert p.read_bytes() == (paths[1].parent / p.name).read_bytes(), p.name
    assert (first / f"ablation-{HW4}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths[0].read_text()
    assert f"(ablation-{HW4}.png)" in text and "[`ablations.csv`](ablations.csv)" in text
    assert text.index("## Ablations") < text.index("## Environment")
    csv = pd.read_csv(first / "ablations.csv")
    assert list(csv.variant) == [
        "recipe",
        "reported",
        "eval-mode",
        "running-train-acc",
        "post-add-relu",
        "lr-0.1",
        "all-standard",
    ]
    row = csv.set_index("variant").loc["eval-mode"]
    assert (row.seeds, row.test) == (3, "paired t")
    assert row.baseline == pytest.approx(np.mean(RECIPE_FINALS))  # the recipe runs it was paired with
    assert pd.isna(csv.set_index("variant").loc["reported", "seeds"])  # a reported figure, not a count of seeds
    assert row.difference == pytest.approx(np.mean(EVAL_FINALS) - np.mean(RECIPE_FINALS))
    assert csv.set_index("variant").loc["reported", "difference"] == pytest.approx(REPORTED - np.mean(RECIPE_FINALS))
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (first / link).is_file()


def _study(name: str, base_hash: str) -> optuna.Study:
    study = optuna.create_study(study_name=name, direction="maximize")
    study.set_user_attr("bench.base_config_hash", base_hash)
    study.optimize(lambda t: t.suggest_float("optim.lr", 0.01, 0.1), n_trials=1)
    return study


def test_a_study_on_an_ablations_config_is_linked_both_ways():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    handles = {
        "hw4-relu": _study("hw4-relu", "h2"),
        "hw4-recipe": _study("hw4-recipe", "h1"),
        "other": _study("other", "h9"),
    }
    trials = pd.concat([results.trial_frame(n, HW4, "paper", s.trials) for n, s in handles.items()], ignore_index=True)
    studies = results.Studies(
        trials=trials, handles=handles, intermediate=pd.DataFrame(columns=results.INTERMEDIATE_COLUMNS)
    )
    t = ablations.tables(_summary(hw4_records()), studies)[0]
    tuned = {l.variant: l.studies for l in t.lines if l.studies}
    assert tuned == {"post-add-relu": ("hw4-relu",), "all-standard": ("hw4-relu",), "recipe": ("hw4-recipe",)}
    assert "; tuned: study `hw4-relu`" in ablations.markdown([t], {})
    links = ablations.study_links([t])
    assert links["hw4-relu"].startswith("ablation `post-add-relu` of `hw4-resnet-cifar100`")
    text = study_section.markdown(studies, {}, links)
    assert "Tuned on the config of ablation `post-add-relu` of `hw4-resnet-cifar100`" in text
    assert "hw4-recipe" not in links and text.count("Tuned on the config of") == 1


def test_through_mlflow_on_sqlite(tmp_path):
    """Runs logged as `bench run --ablate` logs them on the smoke profile, read back by
    `results.load`: the evaluation-only figures arrive as final_<metric>/<key>-<value> columns."""
    from mlflow.entities import Metric

    from bench.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    exp_id = tracker.experiment_id(HW4)
    found = {v.name: v for v in ablation.variants(HW4, "smoke")}

    def log(variant, seed, test_acc, extra=()):
        tags = {
            "bench.experiment": HW4,
            "bench.profile": "smoke",
            "bench.seed": str(seed),
            "bench.config_hash": variant.config_hash,
            "bench.status": "finished",
            "bench.epochs_done": "2",
            "bench.ablation": variant.name,
            "bench.data_complete": "false",
            "bench.data_train": "1000",
            "bench.data_val": "0",
            "bench.data_test": "500",
        }
        run_id = tracker.start_run(exp_id, f"{HW4}-smoke-{variant.name}-seed{seed}", tags)
        metrics = [Metric("test_acc", v, 0, step) for step, v in enumerate([test_acc / 2, test_acc], 1)]
        metrics += [Metric(name, v, 0, 2) for name, v in extra]
        tracker.client.log_batch(run_id, metrics=metrics)
        tracker.end_run(run_id, "FINISHED")

    for seed, (acc, evaluated) in enumerate([(0.040, 0.052), (0.046, 0.061), (0.043, 0.055)]):
        log(
            found["recipe"],
            seed,
            acc,
            [
                ("test_acc/eval.mode-eval", evaluated),
                ("train_acc", 0.2),
                ("train_acc/eval.remeasure_train_acc-false", 0.18 + seed / 100),
            ],
        )
    for seed, acc in enumerate([0.050, 0.047]):
        log(found["post-add-relu"], seed, acc)
    s = report.summarize(results.load(uri, [HW4]), [HW4], suite="x", profile="smoke")
    assert [r.label for r in s.rows] == [
        None,
        "ablation post-add-relu: model.post_add_relu=true",
    ]  # its runs log no params here
    t = ablations.tables(s)[0]
    lines = lines_of(t)
    ref = sps.ttest_rel([0.052, 0.061, 0.055], [0.040, 0.046, 0.043])
    assert lines["eval-mode"].difference.p == pytest.approx(ref.pvalue)
    assert lines["running-train-acc"].difference.mean == pytest.approx(-0.01)
    assert lines["post-add-relu"].difference.p == pytest.approx(
        sps.ttest_ind([0.050, 0.047], [0.040, 0.046, 0.043], equal_var=False).pvalue
    )
    assert lines["shortcut-1x1"].verdict == f"not run: `bench run {HW4} --ablate --profile smoke`"
    assert t.shown and t.sentence.startswith(
        "Profile `smoke` is not the reported recipe on the full dataset (subset of CIFAR)"
    )


def test_a_variant_whose_interval_holds_zero_closes_nothing_when_the_recipe_is_above():
    t = ablations.tables(
        _summary(hw4_records(recipe=[0.70, 0.71, 0.72], evals=[0.70, 0.715, 0.72], relu=[0.66, 0.72, 0.70]))
    )[0]
    d = lines_of(t)["post-add-relu"].difference
    assert d.low < 0 < d.high  # -1.7 pt [-8.5, 5.1], p = 0.45
    assert "post-add-relu" not in t.sentence


def test_a_variant_that_lowers_accuracy_closes_the_gap_when_the_recipe_is_above():
    t = ablations.tables(
        _summary(hw4_records(recipe=[0.70, 0.71, 0.72], evals=[0.70, 0.715, 0.72], relu=[0.665, 0.67, 0.675]))
    )[0]
    d = lines_of(t)["post-add-relu"].difference
    assert t.sentence.startswith("The recipe is 7.7 pt above the reported 63.31 %; ")
    # The move toward the figure is -difference: its interval holds its mean.
    assert f"post-add-relu closes 4.0 pt [{stats.points(-d.high)}, {stats.points(-d.low)}] of it" in t.sentence
    assert -d.high < -d.mean < -d.low


def test_a_variant_that_overshoots_does_not_close_more_than_the_gap():
    t = ablations.tables(_summary(hw4_records(relu=[0.78, 0.79, 0.80])))[0]  # gap 15.3 pt, effect +31 pt
    d = lines_of(t)["post-add-relu"].difference
    assert "closes 31.0 pt" not in t.sentence
    assert (
        f"post-add-relu overshoots it (31.0 pt [{stats.points(d.low)}, {stats.points(d.high)}], the gap is 15.3 pt)"
        in t.sentence
    )


def test_a_variant_whose_interval_holds_the_gap_may_close_all_of_it():
    t = ablations.tables(_summary(hw4_records(relu=[0.60, 0.65, 0.62])))[0]  # +14.3 pt, its interval past 15.3
    assert "post-add-relu may close all of it (14.3 pt [" in t.sentence


def test_a_variant_reproduces_the_figure_only_when_it_moves_toward_it():
    # n = 2: t = 12.7 makes the variant's own interval [0, 1]: it holds the figure, but the move
    # toward it is not told apart from noise.
    t = ablations.tables(_summary(hw4_records(relu=[0.55, 0.70])))[0]
    relu = lines_of(t)["post-add-relu"]
    assert stats.verdict(REPORTED, relu.interval) == "reproduced" and relu.difference.low < 0
    assert t.sentence.endswith("; no variant reaches it.")


def test_a_study_of_the_recipe_is_not_linked_to_a_variant_of_the_recipes_config():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    same = ablation.Variant(
        "val-split",
        ablation.TRAINED,
        ("data.val_size=0",),
        "data.val_size=0",
        "s",
        "h1",
        VARIANTS[HW4][4].ablation,
        "recipe",
    )
    handles = {"hw4-recipe": _study("hw4-recipe", "h1")}
    trials = pd.concat([results.trial_frame(n, HW4, "paper", s.trials) for n, s in handles.items()], ignore_index=True)
    studies = results.Studies(
        trials=trials, handles=handles, intermediate=pd.DataFrame(columns=results.INTERMEDIATE_COLUMNS)
    )
    t = ablations.tables(_summary(hw4_records(), variants={HW4: [VARIANTS[HW4][0], same, VARIANTS[HW4][3]]}), studies)[
        0
    ]
    assert lines_of(t)["val-split"].studies == () and lines_of(t)["recipe"].studies == ("hw4-recipe",)
    assert "hw4-recipe" not in ablations.study_links([t])


def _markdown_rows(t):
    text = ablations.markdown([t], {})
    return {l.split(" | ")[0].lstrip("| "): l for l in text.splitlines() if l.startswith("| ") and "---" not in l}


def test_an_evaluation_only_row_shows_the_baseline_it_is_paired_with(table):
    rows = _markdown_rows(table)
    # train_acc measured the running way, against the same runs' re-measured train_acc (not the recipe row's test_acc).
    assert "| 56.17 % [" in rows["running-train-acc"] and "(recipe 61.00 %, 3 pairs) |" in rows["running-train-acc"]
    assert "(recipe 48.00 %, 3 pairs) |" in rows["eval-mode"]
    assert "pairs" not in rows["post-add-relu"]
    assert "same recipe runs' own figure of its metric" in ablations.INTRO


def test_a_run_whose_extra_measure_stopped_at_another_epoch_is_left_out_of_the_pair():
    recs = hw4_records()
    recs[0]["history"]["test_acc/eval.mode-eval"] = [(1, 0.3)]  # the last epoch's extra pass never logged
    line = lines_of(ablations.tables(_summary(recs))[0])["eval-mode"]
    assert (line.difference.n_a, line.baseline.n) == (2, 2)
    assert line.difference.p == pytest.approx(sps.ttest_rel(EVAL_FINALS[1:], RECIPE_FINALS[1:]).pvalue)
    assert lines_of(ablations.tables(_summary(recs))[0])["running-train-acc"].difference.n_a == 3


def test_tiny_p_values_and_zero_differences_print_plainly():
    t = ablations.tables(_summary(hw4_records(relu=[0.78, 0.79, 0.80])))[0]
    assert lines_of(t)["post-add-relu"].difference.p < 1e-4
    assert "| < 0.0001 (Welch's t) |" in _markdown_rows(t)["post-add-relu"]
    t = ablations.tables(_summary(hw4_records(relu=[0.469999, 0.48, 0.49])))[0]  # -0.0003 pt
    row = _markdown_rows(t)["post-add-relu"]
    assert "| +0.00 pt [" in row and "-0.00" not in row and "-0.0 " not in lines_of(t)["post-add-relu"].verdict


def test_the_reported_row_without_a_reported_final_figure_prints_a_dash():
    curves = report.summarize(results.frames([]), [HW4], suite="x", variants={}, **SAME).curves
    t = ablations.tables(_summary(hw4_records(recipe=[]), curves=curves.iloc[0:0]))[
        0
    ]  # the variant ran, the recipe did not
    assert t.shown and t.reported is None
    row = _markdown_rows(t)["reported"]
    assert "nan" not in row and "| reported | test_acc | - | - | - | - |" in row


def _dashed(fig) -> list:
    return [l for l in fig.axes[0].get_lines() if l.get_linestyle() == "--"]


def test_the_figure_draws_the_gap_only_where_the_recipe_is_comparable():
    from bench.report import figures

    paper = ablations.tables(_summary(hw4_records()))[0]
    assert len(_dashed(figures.ablation_plot(paper))) == 1
    smoke = ablations.tables(_summary(hw4_records(complete="false")))[0]
    assert _dashed(figures.ablation_plot(smoke)) == []
    text = ablations.markdown([smoke], {HW4: "a.png"})
    assert (
        "The figure draws no line at the reported figure: profile `paper` is not comparable to it (subset of CIFAR)."
        in text
    )
    assert "draws no line" not in ablations.markdown([paper], {HW4: "a.png"})


def test_the_figure_uses_the_tables_word_for_a_measure_the_runs_lack():
    from bench.report import figures

    t = ablations.tables(_summary(hw4_records(evals=None)))[0]
    words = [x.get_text().strip() for x in figures.ablation_plot(t).axes[0].texts]
    assert words.count("not measured") == 2 and words.count("not run") == 1  # eval-mode, running-train-acc; lr-0.1


def test_a_variants_runs_under_its_configs_earlier_hash_are_its_own():
    recipe = config.load(HW4, profile="paper")
    mine = report.Recipe(recipe.config_hash(), {})
    # All standard: its evaluation draws nothing, so an earlier bench ran it the same way.
    standard = {v.name: v for v in ablation.variants(HW4, "paper")}[ablation.ALL_STANDARD]
    relu = config.load(HW4, profile="paper", sets=list(standard.sets))
    assert relu.earlier_hash() not in (None, relu.config_hash())
    recs = [r for r in hw4_records() if r["tags"]["bench.config_hash"] == "h1"]
    for r in recs:
        r["tags"]["bench.config_hash"] = recipe.config_hash()
    recs += [
        record(HW4, s, [v / 2, v], config_hash=relu.earlier_hash(), val=0, start=10)
        for s, v in enumerate(RELU_FINALS[:2])
    ]
    recs += [record(HW4, 2, [0.25, RELU_FINALS[2]], config_hash=relu.config_hash(), val=0, start=20)]
    s = report.summarize(results.frames(recs), [HW4], suite="x", recipes={HW4: mine}, paper={HW4: mine})
    assert [r.label for r in s.rows] == [None, f"ablation all-standard: {standard.label}"]
    line = lines_of(ablations.tables(s)[0])[ablation.ALL_STANDARD]
    assert line.interval.n == 3 and line.interval.mean == pytest.approx(np.mean(RELU_FINALS))


def test_an_ablation_invalid_under_the_profile_leaves_the_rest_of_the_report(tmp_path, monkeypatch):
    import shutil

    experiments = tmp_path / "experiments"
    shutil.copytree(config.experiments_dir(), experiments)
    monkeypatch.setenv("BENCH_EXPERIMENTS", str(experiments))
    path = experiments / f"{HW4}.toml"
    path.write_text(
        path.read_text().replace('set = { "model.shortcut_kernel" = 1 }', 'set = { "model.no_such_key" = 1 }')
    )
    mine = report.Recipe(config.load(HW4, profile="paper").config_hash(), {})
    s = report.summarize(results.frames(hw4_records()), [HW4], suite="x", recipes={HW4: mine}, paper={HW4: mine})
    assert s.ablations[HW4] == [] and "shortcut-1x1" in s.ablation_errors[HW4]
    t = ablations.tables(s)[0]
    assert t.shown and t.error == s.ablation_errors[HW4]
    readme = report.write(s, tmp_path / "out").read_text()
    assert f"### `{HW4}`\n\nNo ablation table: ablation shortcut-1x1 of {HW4}: " in readme
    assert "## Environment" in readme and not (tmp_path / "out" / f"ablation-{HW4}.png").exists()


def test_a_variant_whose_runs_are_all_under_its_earlier_hash_is_not_said_unrun():
    recipe = config.load(HW4, profile="paper")
    mine = report.Recipe(recipe.config_hash(), {})
    standard = {v.name: v for v in ablation.variants(HW4, "paper")}[ablation.ALL_STANDARD]
    before = config.load(HW4, profile="paper", sets=list(standard.sets)).earlier_hash()
    recs = [r for r in hw4_records() if r["tags"]["bench.config_hash"] == "h1"]
    for r in recs:
        r["tags"]["bench.config_hash"] = recipe.config_hash()
    recs += [record(HW4, s, [v / 2, v], config_hash=before, val=0, start=10) for s, v in enumerate(RELU_FINALS)]
    s = report.summarize(results.frames(recs), [HW4], suite="x", recipes={HW4: mine}, paper={HW4: mine})
    line = lines_of(ablations.tables(s)[0])[ablation.ALL_STANDARD]
    assert line.interval.n == 3 and line.interval.mean == pytest.approx(np.mean(RELU_FINALS)), line.verdict


def test_an_evaluation_only_switch_the_recipe_has_shows_the_recipes_figures():
    variants = {HW4: [VARIANTS[HW4][0], _variant(EVAL, "h1", ablation.EVALUATION_ONLY, same_as=ablation.RECIPE)]}
    t = ablations.tables(_summary(hw4_records(evals=None), variants=variants))[0]
    line = lines_of(t)["eval-mode"]
    assert line.verdict == "the recipe measures this way already: its figures are the recipe's"
    assert line.interval == lines_of(t)[ablation.RECIPE].interval and line.difference is None
