"""The command line: `bench list`, `bench run` (dry run, missing data, bad input, end to end) and
its exit codes: 0 ok, 1 a run failed, 2 a usage or input error with one line and no traceback."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from conftest import TINY_SETS

from bench import cli

EXPERIMENTS = ["bottleneck-cifar10", "hw4-resnet-cifar100", "resnet18-finetune-cifar100", "resnetb-cifar10"]
MODELS = ["bottleneck_resnet", "hw4_resnet", "resnet18_finetune", "resnet_b"]
TINY_ARGS = [arg for s in TINY_SETS for arg in ("--set", s)]
# Any download attempt goes to a closed local port: the tests never reach the network.
NO_NETWORK = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def bench(args: list[str], cwd, env, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in env.items() if k.lower() != "no_proxy"}
    env.update(NO_NETWORK)
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(rc: int, err: str, *names: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bench: error: ")
    for name in names:
        assert name in lines[0], lines[0]


# --- list --------------------------------------------------------------------------------------


def check_listing(out: str) -> None:
    sections = {}
    current = None
    for line in out.splitlines():
        if not line.startswith(" "):
            current = line.rstrip(":")
            sections[current] = []
        else:
            sections[current].append(line.split()[0])
    assert list(sections) == ["experiments", "suites", "profiles", "models"]
    assert sections["experiments"] == EXPERIMENTS
    assert "all" in sections["suites"] and "cifar10" in sections["suites"]
    assert sections["profiles"] == ["paper", "smoke"]
    assert sections["models"] == MODELS


def test_list_in_process(in_tmp, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    check_listing(out)
    assert "HW4 residual net from scratch on CIFAR-100" in out
    assert "(3 seeds)" in out


@pytest.mark.slow
def test_list_as_a_module(tmp_path, subprocess_env):
    proc = bench(["list"], tmp_path, subprocess_env)
    assert proc.returncode == 0, proc.stderr
    check_listing(proc.stdout)


# --- dry run -----------------------------------------------------------------------------------


def test_dry_run_of_the_paper_suite_lists_twelve_cells_with_their_recipes(in_tmp, capsys):
    assert cli.main(["run", "--suite", "all", "--profile", "paper", "--dry-run"]) == 0
    out = capsys.readouterr().out
    cells = [line for line in out.splitlines() if "/paper/seed" in line]
    assert len(cells) == 12
    assert {line.split()[0] for line in cells} == {f"{e}/paper/seed{s}" for e in EXPERIMENTS for s in range(3)}
    hw4 = next(line for line in cells if line.startswith("hw4-resnet-cifar100/"))
    assert "sgd lr=0.01 " in hw4 and "mom=0.9" in hw4 and "bs=256" in hw4 and hw4.rstrip().endswith("100")
    r2 = next(line for line in cells if line.startswith("resnet18-finetune-cifar100/"))
    assert "adam lr=0.001" in r2 and "exp x0.95" in r2 and "224px" in r2
    r4 = next(line for line in cells if line.startswith("resnetb-cifar10/"))
    assert "step 20 x0.1" in r4 and "lr=0.1 " in r4
    # R1 and R2 train on all 50k images as their authors did; R3 and R4 hold out 5k as theirs did.
    assert "val=0 " in hw4 and "val=0 " in r2
    r3 = next(line for line in cells if line.startswith("bottleneck-cifar10/"))
    assert "val=5000 " in r3 and "val=5000 " in r4
    assert "12 cells (4 experiments x 3 seeds), profile paper" in out
    # A dry run needs no data and touches no store.
    assert not (in_tmp / "mlflow.db").exists() and not (in_tmp / "data").exists()


def test_dry_run_counts_seeds_and_deduplicates_experiments(in_tmp, capsys):
    args = [
        "run",
        "resnetb-cifar10",
        "--suite",
        "cifar10",
        "--profile",
        "smoke",
        "--seeds",
        "2",
        "--epochs",
        "5",
        "--dry-run",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    cells = [line for line in out.splitlines() if "/smoke/seed" in line]
    assert sorted(line.split()[0] for line in cells) == [
        "bottleneck-cifar10/smoke/seed0",
        "bottleneck-cifar10/smoke/seed1",
        "resnetb-cifar10/smoke/seed0",
        "resnetb-cifar10/smoke/seed1",
    ]
    assert all(line.rstrip().endswith(" 5") and "embedded" in line for line in cells)
    assert "4 cells (2 experiments x 2 seeds), profile smoke" in out


def test_shards_cover_every_cell_exactly_once(in_tmp, capsys):
    base = ["run", "--suite", "all", "--profile", "paper", "--dry-run"]
    assert cli.main(base) == 0
    everything = [line.split()[0] for line in capsys.readouterr().out.splitlines() if "/paper/seed" in line]
    for n in (1, 2, 3, 5, 12, 13):
        shards = []
        for i in range(1, n + 1):
            assert cli.main([*base, "--shard", f"{i}/{n}"]) == 0
            out = capsys.readouterr().out
            shards.append([line.split()[0] for line in out.splitlines() if "/paper/seed" in line])
            assert f"shard {i}/{n}: {len(shards[-1])} of 12 cells" in out
        assert sorted(c for shard in shards for c in shard) == sorted(everything)  # each cell once
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
        # The same split every time.
        assert cli.main([*base, "--shard", f"1/{n}"]) == 0
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines() if "/paper/seed" in line] == shards[0]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_missing_data_stops_before_training_with_advice(tmp_path, subprocess_env):
    proc = bench(["run", "--suite", "all", "--profile", "paper"], tmp_path, subprocess_env)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("bench: error:")]
    assert len(error) == 1, proc.stderr
    for text in ("data", "cifar-100-python.tar.gz", "--profile smoke", "--data-dir"):
        assert text in error[0], error[0]
    # Nothing trained and nothing tracked.
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "checkpoints").exists()
    assert proc.stdout == ""


BAD_INPUTS = [
    (["run", "nope"], ["unknown experiment", "nope"]),
    (["run", "--suite", "nope"], ["unknown suite", "nope"]),
    (["run", "resnetb-cifar10", "--profile", "nope"], ["unknown profile", "nope"]),
    (["run", "resnetb-cifar10", "--set", "optim.lr=-1"], ["optim.lr"]),
    (["run", "resnetb-cifar10", "--set", "optim.nope=1"], ["optim.nope", "unknown key"]),
    (["run", "resnetb-cifar10", "--set", "garbage"], ["--set", "garbage"]),
    (["run", "resnetb-cifar10", "--set", "model.nope=1"], ["nope"]),
    (["run", "resnetb-cifar10", "--seeds", "0"], ["--seeds"]),
    (["run", "resnetb-cifar10", "--epochs", "0"], ["--epochs"]),
    (["run"], ["--suite"]),
    (["run", "--suite", "all", "--shard", "3/2"], ["--shard", "3/2"]),
    (["run", "--suite", "all", "--shard", "0/2"], ["--shard", "0/2"]),
    (["run", "--suite", "all", "--shard", "half"], ["--shard", "I/N"]),
    (["tune", "resnetb-cifar10", "--workers", "-1"], ["--workers"]),
]


@pytest.mark.parametrize("args, names", BAD_INPUTS, ids=[" ".join(a[1:]) or "nothing" for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(args, names, in_tmp, capsys):
    rc = cli.main(args)
    out, err = capsys.readouterr()
    assert_one_line_error(rc, err, *names)
    assert out == ""
    assert not (in_tmp / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_exits_2(in_tmp, capsys):
    rc = cli.main(["run", "resnetb-cifar10", "--profile", "smoke", "--device", "cuda"])
    out, err = capsys.readouterr()
    assert_one_line_error(rc, err, "--device cuda", "CUDA")
    assert not (in_tmp / "mlflow.db").exists()


@pytest.mark.parametrize("device", ["tpu", "cuda:abc"])
def test_unknown_device_exits_2(device, in_tmp, capsys):
    rc = cli.main(["run", "resnetb-cifar10", "--profile", "smoke", "--device", device])
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, device)


def test_model_option_with_wrong_item_type_exits_2(in_tmp, capsys):
    rc = cli.main(["run", "resnetb-cifar10", "--profile", "smoke", "--set", "model.widths=[4.5,8,8]"])
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, "model.widths")


def test_unusable_tracking_uri_exits_2(in_tmp, capsys):
    rc = cli.main(["run", "resnetb-cifar10", "--profile", "smoke", *TINY_ARGS, "--tracking-uri", "nope://store"])
    _, err = capsys.readouterr()
    assert_one_line_error(rc, err, "tracking store", "nope://store")
    assert not (in_tmp / "checkpoints").exists()


@pytest.mark.slow
def test_bad_input_as_a_module_exits_2_without_traceback(tmp_path, subprocess_env):
    proc = bench(["run", "resnetb-cifar10", "--set", "optim.lr=-1"], tmp_path, subprocess_env)
    assert_one_line_error(proc.returncode, proc.stderr, "optim.lr")


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_a_run_that_does_not_finish_exits_1(in_tmp, capsys):
    rc = cli.main(
        ["run", "resnetb-cifar10", "--profile", "smoke", "--epochs", "1", *TINY_ARGS, "--set", "optim.lr=1e30"]
    )
    out, err = capsys.readouterr()
    assert rc == 1, err
    row = next(line for line in out.splitlines() if line.startswith("resnetb-cifar10/smoke/seed0"))
    assert row.split()[1] == "nonfinite"
    assert "1 of 1 cells did not finish: resnetb-cifar10/smoke/seed0" in err
    assert "Traceback" not in err


def test_an_error_before_training_fails_that_cell_and_the_suite_goes_on(in_tmp, capsys):
    """Resuming seed 0 needs its checkpoint from its MLflow run, and a directory stands where the
    fetched last.pt goes: that cell fails (run FAILED, the reason tagged), seed 1 still trains."""
    from mlflow.tracking import MlflowClient

    from bench import suite
    from bench.tracking import Tracker

    args = ["resnetb-cifar10", "--profile", "smoke", "--epochs", "1", "--seeds", "2", *TINY_ARGS]
    first = suite.plan(["resnetb-cifar10"], profile="smoke", seeds=1, sets=TINY_SETS, epochs=1)[0]
    tracker = Tracker("sqlite:///mlflow.db")
    run_id = tracker.start_run(tracker.experiment_id("resnetb-cifar10"), first.run_name, first.tags)
    (in_tmp / "last.pt").write_bytes(b"not a checkpoint")
    tracker.client.log_artifact(run_id, str(in_tmp / "last.pt"), artifact_path="checkpoints")
    tracker.client.set_terminated(run_id, "KILLED")  # a run killed on another machine
    blocked = first.checkpoint_dir(in_tmp / "checkpoints") / "last.pt"
    (blocked / "stray").mkdir(parents=True)

    rc = cli.main(["run", *args])
    out, err = capsys.readouterr()
    assert rc == 1, err
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("resnetb-cifar10/")}
    assert rows == {"resnetb-cifar10/smoke/seed0": "failed", "resnetb-cifar10/smoke/seed1": "finished"}
    assert "1 of 2 cells did not finish: resnetb-cifar10/smoke/seed0" in err
    run = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["bench.failure"] == "error"
    assert run.data.tags["bench.failure_reason"].startswith(("IsADirectoryError", "OSError")), run.data.tags


def test_a_cell_whose_checkpoint_directory_cannot_be_made_fails_and_the_suite_goes_on(in_tmp, capsys):
    """The error comes before the cell has a run (its lock and lease need the directory): that cell
    fails, with no run to mark, and the next one trains."""
    from bench import suite

    first = suite.plan(["resnetb-cifar10"], profile="smoke", seeds=1, sets=TINY_SETS, epochs=1)[0]
    blocked = first.checkpoint_dir(in_tmp / "checkpoints")
    blocked.parent.mkdir(parents=True)
    blocked.write_text("a file where the checkpoint directory goes")
    rc = cli.main(["run", "resnetb-cifar10", "--profile", "smoke", "--epochs", "1", "--seeds", "2", *TINY_ARGS])
    out, err = capsys.readouterr()
    assert rc == 1, err
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("resnetb-cifar10/")}
    assert rows == {"resnetb-cifar10/smoke/seed0": "failed", "resnetb-cifar10/smoke/seed1": "finished"}


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_run_then_skip(tmp_path, subprocess_env):
    args = ["run", "resnetb-cifar10", "--profile", "smoke", "--epochs", "1", *TINY_ARGS]
    proc = bench(args, tmp_path, subprocess_env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["cell", "status", "epochs"]
    row = next(line for line in lines if line.startswith("resnetb-cifar10/smoke/seed0"))
    assert row.split()[1:3] == ["finished", "1"]
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in proc.stdout
    assert (tmp_path / "mlflow.db").is_file()
    assert list((tmp_path / "checkpoints" / "resnetb-cifar10").glob("smoke-seed0-*/last.pt"))

    again = bench(args, tmp_path, subprocess_env)
    assert again.returncode == 0, again.stderr
    row = next(line for line in again.stdout.splitlines() if line.startswith("resnetb-cifar10/smoke/seed0"))
    assert row.split()[1:3] == ["skipped", "1"]
    assert "mlflow ui" in again.stdout


# --- report ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_then_report_writes_markdown_and_figures_that_resolve(in_tmp, subprocess_env, capsys):
    run = ["run", "--suite", "cifar10", "--profile", "smoke", "--seeds", "2", "--epochs", "2", *TINY_ARGS]
    assert cli.main(run) == 0
    proc = bench(["report", "--suite", "cifar10"], in_tmp, subprocess_env)
    assert proc.returncode == 0, proc.stderr
    assert "Report: reports/cifar10/README.md" in proc.stdout
    assert "2 seeds  not comparable (subset of CIFAR)" in proc.stdout
    out = in_tmp / "reports" / "cifar10"
    text = (out / "README.md").read_text()
    assert "# Report: suite `cifar10`, profile `smoke`" in text
    # --epochs and the tiny model make another config than the smoke recipe: rows of their own,
    # and no recipe runs to compare bottleneck with ResNet-B.
    for name in ("bottleneck-cifar10", "resnetb-cifar10"):
        row = next(l for l in text.splitlines() if l.startswith("| R") and name in l and "other config: " in l)
        assert row.count(" % ") >= 3 and "| 2 |" in row  # reported figures, the suite's mean, 2 seeds
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (out / link).is_file(), link
    assert "Welch's t-test needs at least two finished seeds" in text
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["report", "--suite", "cifar10", "--profile", "smoke"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first

    # A study in ./optuna.db (where `bench tune` keeps them) adds the tuning section; --storage none leaves it out.
    from test_report_studies import make_study

    make_study("sqlite:///optuna.db", "resnetb-cifar10-smoke")
    proc = bench(["report", "--suite", "cifar10"], in_tmp, subprocess_env)
    assert proc.returncode == 0 and "tuning: resnetb-cifar10-smoke" in proc.stdout
    # The report's own lines only: no Optuna log line for its in-memory copies of the study.
    assert "[I " not in proc.stderr and "study created" not in proc.stderr, proc.stderr
    text = (out / "README.md").read_text()
    assert "### Study `resnetb-cifar10-smoke`: resnetb-cifar10, profile `smoke`" in text
    assert (
        "(tuning_resnetb-cifar10-smoke_history.png)" in text
        and (out / "tuning_resnetb-cifar10-smoke_history.png").is_file()
    )
    assert cli.main(["report", "--suite", "cifar10", "--storage", "none"]) == 0
    assert "## Tuning" not in (out / "README.md").read_text()
    capsys.readouterr()
    rc = cli.main(["report", "--suite", "cifar10", "--storage", "sqlite:///mlflow.db"])  # MLflow's, not Optuna's
    assert_one_line_error(rc, capsys.readouterr().err, "sqlite:///mlflow.db", "not an Optuna database")
    (in_tmp / "a-file").write_text("")
    rc = cli.main(["report", "--suite", "cifar10", "--out", str(in_tmp / "a-file" / "report")])
    assert_one_line_error(rc, capsys.readouterr().err, "a-file", "cannot write")


@pytest.mark.parametrize(
    "args, names",
    [
        (["report", "--suite", "nope"], ["nope", "all"]),
        (["report", "--profile", "nope"], ["nope", "smoke"]),
        (["report"], ["no runs", "bench run --suite all"]),
        (["report", "--tracking-uri", "nope://store"], ["nope://store"]),
        (["report", "--storage", "sqlite:///missing.db"], ["missing.db", "--storage"]),
        (
            ["report", "--storage", "postgresql://bench:s3cret@127.0.0.1:1/optuna"],
            ["bench:***@127.0.0.1:1", "not usable"],
        ),
    ],
)
def test_report_bad_input_exits_2(args, names, in_tmp, capsys):
    rc = cli.main(args)
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, *names)
    assert "s3cret" not in err
