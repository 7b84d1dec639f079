"""Property: every mistake in a command line or a config file ends with exit code 2 and one line
on stderr that names what to fix, never a traceback. Each example fails before any training."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench import cli, config
from bench.models import list_models

EXPERIMENT = "resnetb-cifar10"
DRY = ["run", EXPERIMENT, "--profile", "smoke", "--dry-run"]
FLAT = config.load(EXPERIMENT, profile="smoke").flat()
SECTIONS = {"data", "optim", "schedule", "train", "eval"}
CHOICES = {  # the values a string key may take: anything else is a mistake
    "data.dataset": {"cifar10", "cifar100"},
    "data.source": {"official", "embedded"},
    "data.augment": {"crop_flip", "resized_crop_flip", "none"},
    "optim.name": {"sgd", "adam"},
    "schedule.name": {"none", "step", "exponential", "cosine"},
    "eval.mode": {"eval", "train"},
    "model.name": set(list_models()),
}
# Numbers out of range, by key: (strategy of bad values).
OUT_OF_RANGE = {
    "optim.lr": st.floats(max_value=0),
    "optim.momentum": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1)),
    "optim.weight_decay": st.floats(max_value=-1e-9),
    "data.batch_size": st.integers(max_value=0),
    "data.eval_batch_size": st.integers(max_value=0),
    "data.val_size": st.integers(max_value=-1),
    "data.image_size": st.integers(max_value=7),
    "data.crop_padding": st.integers(max_value=-1),
    "train.epochs": st.integers(max_value=0),
    "train.checkpoint_every": st.integers(max_value=0),
    "schedule.step_size": st.integers(max_value=0),
    "schedule.gamma": st.one_of(st.floats(max_value=0), st.floats(min_value=1.001)),
    "schedule.eta_min": st.floats(max_value=-1e-9),
    "model.stem_width": st.integers(max_value=0),
    "model.blocks_per_stage": st.integers(max_value=0),
    "model.expansion": st.integers(max_value=0),
    "data.std": st.lists(st.floats(max_value=0), min_size=3, max_size=3),
    "model.widths": st.one_of(st.just([]), st.lists(st.integers(max_value=0), min_size=1, max_size=4)),
    "optim.lr ": st.sampled_from([float("nan"), float("inf"), float("-inf")]),
}
NAME = st.from_regex(r"\A[a-z][a-z0-9_]{0,10}\Z")
TEXT = st.text(st.characters(codec="ascii", categories=["L", "N", "P", "S"]), min_size=1, max_size=20)
PLAIN = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_./-]{0,15}\Z")  # a string that stays a string in TOML


def toml(value) -> str:
    """A Python value as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {float("inf"): "inf", float("-inf"): "-inf"}.get(value, "nan" if value != value else repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def wrong_type(key: str):
    """Values of the wrong type for `key`."""
    recipe = FLAT[key]
    junk = [st.dictionaries(NAME, st.integers(), min_size=1, max_size=2)]
    if isinstance(recipe, bool):
        return st.one_of(st.integers(), st.floats(allow_nan=False), PLAIN, *junk)
    if isinstance(recipe, int):
        return st.one_of(
            st.booleans(),
            PLAIN,
            st.floats(allow_nan=False).filter(lambda f: not f.is_integer()),
            st.floats(allow_nan=False, allow_infinity=False).filter(float.is_integer),
            st.lists(st.integers(), max_size=2),
            *junk,
        )
    if isinstance(recipe, float):
        return st.one_of(st.booleans(), PLAIN, st.lists(st.floats(), max_size=2), *junk)
    if isinstance(recipe, str):
        return st.one_of(
            st.integers(),
            st.booleans(),
            st.floats(allow_nan=False),
            PLAIN.filter(lambda s: s not in CHOICES.get(key, ())),
            *junk,
        )
    return st.one_of(PLAIN, st.integers(), st.lists(PLAIN, min_size=1, max_size=3), *junk)  # lists


@st.composite
def bad_assignment(draw) -> tuple[str, object]:
    """(key, value): an unknown key, a value of the wrong type, or a number out of range."""
    kind = draw(st.sampled_from(["unknown", "type", "range"]))
    if kind == "unknown":
        section = draw(st.sampled_from([*sorted(SECTIONS), "model", ""]))
        name = draw(
            NAME.filter(
                lambda n: (
                    f"{section}.{n}".lstrip(".") not in FLAT and n not in ("experiment", "seed", "model", *SECTIONS)
                )
            )
        )
        return f"{section}.{name}".lstrip("."), draw(st.integers())
    if kind == "type":
        key = draw(st.sampled_from(sorted(k for k in FLAT if k not in ("experiment", "seed"))))
        return key, draw(wrong_type(key))
    key = draw(st.sampled_from(sorted(OUT_OF_RANGE)))
    return key.strip(), draw(OUT_OF_RANGE[key])


def call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:  # argparse's own errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def error_line(rc: int, out: str, err: str) -> str:
    """The one error line, after checking exit code 2 and no traceback; argparse's usage lines
    (the first starts with `usage:`, the rest are indented) are allowed before it."""
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, err
    assert re.match(r"bench( \w+)?: error: \S", lines[0]), lines[0]
    return lines[0]


def examples(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@pytest.fixture
def offline(in_tmp, monkeypatch):
    """In a scratch directory; a dataset download goes to a closed local port and fails at once."""
    for k in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(k, raising=False)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(k, "http://127.0.0.1:9")
    return in_tmp


@examples(150)
@given(bad_assignment())
def test_a_bad_set_exits_2_naming_the_key(offline, assignment):
    key, value = assignment
    line = error_line(*call([*DRY, "--set", f"{key}={toml(value)}"]))
    assert key in line or (key.startswith("model.") and "model" in line), line


@examples(40)
@given(
    st.one_of(
        TEXT.filter(lambda s: "=" not in s),  # no `=`
        st.builds(
            lambda k, v: f"{k}={v}", st.from_regex(r"\A([a-z]*\.\.|\.|[0-9-])[a-z.]{0,5}\Z"), st.integers()
        ),  # not a dotted name
        st.builds(
            lambda k: f"{k}.x=1", st.sampled_from(sorted(k for k in FLAT if "." in k))
        ),  # a value used as a section
        st.sampled_from(["=1", "experiment=x", "seed=1", "optim=1", "model=[1]"]),
    )
)
def test_a_malformed_assignment_exits_2(offline, text):
    error_line(*call([*DRY, "--set", text]))


NAMES = TEXT.filter(lambda s: not s.startswith("-"))


@examples(60)
@given(
    st.one_of(
        st.builds(lambda n: ["run", n, "--dry-run"], NAMES.filter(lambda n: n not in config.list_experiments())),
        st.builds(lambda n: ["run", "--suite", n, "--dry-run"], NAMES.filter(lambda n: n not in config.read_suites())),
        st.builds(
            lambda n: ["run", EXPERIMENT, "--profile", n, "--dry-run"],
            NAMES.filter(lambda n: n not in config.list_profiles()),
        ),
        st.builds(lambda n: ["report", "--suite", n], NAMES.filter(lambda n: n not in config.read_suites())),
        st.builds(lambda n: ["tune", n, "--best"], NAMES.filter(lambda n: n not in config.list_experiments())),
        st.builds(lambda n: [*DRY, "--set", f"model.name={toml(n)}"], NAMES.filter(lambda n: n not in list_models())),
    )
)
def test_an_unknown_name_exits_2_naming_it(offline, argv):
    line = error_line(*call(argv))
    name = argv[1] if argv[0] == "tune" else argv[-1] if argv[0] == "report" else None
    assert name is None or repr(name) in line or name in line, line


NUMBERS = st.one_of(
    st.builds(lambda f, n: [*DRY, f, str(n)], st.sampled_from(["--seeds", "--epochs"]), st.integers(max_value=0)),
    st.builds(
        lambda f, n: ["tune", EXPERIMENT, "--profile", "smoke", f, str(n)],
        st.sampled_from(["--trials", "--epochs", "--heartbeat"]),
        st.integers(max_value=0),
    ),
    st.builds(lambda n: ["tune", EXPERIMENT, "--profile", "smoke", "--workers", str(n)], st.integers(max_value=-1)),
    st.builds(
        lambda n: ["tune", EXPERIMENT, "--profile", "smoke", "--timeout", repr(n)],
        st.floats(max_value=0, allow_nan=False),
    ),
    st.builds(lambda f, t: [*DRY, f, t], st.sampled_from(["--seeds", "--epochs"]), PLAIN),  # not a number: argparse
    st.builds(
        lambda t: ["run", "--suite", "all", "--dry-run", "--shard", t],
        st.one_of(
            PLAIN,
            st.builds(lambda i, n: f"{i}/{n}", st.integers(), st.integers()).filter(
                lambda s: not 1 <= int(s.split("/")[0]) <= int(s.split("/")[1])
            ),
        ),
    ),
)


@examples(60)
@given(NUMBERS)
def test_a_bad_number_exits_2(offline, argv):
    if (
        "--shard" in argv
        and re.fullmatch(r"\d+/\d+", argv[-1])
        and 1 <= int(argv[-1].split("/")[0]) <= int(argv[-1].split("/")[1])
    ):
        return  # PLAIN drew a valid shard
    error_line(*call(argv))


SCHEME = st.from_regex(r"\A[a-z][a-z0-9]{1,8}\Z").filter(
    lambda s: s not in ("file", "http", "https", "sqlite", "postgresql", "mysql", "mssql", "oracle", "databricks")
)
MALFORMED = st.one_of(
    st.builds(lambda s, rest: f"{s}://{rest}", SCHEME, PLAIN),  # a scheme no store has
    st.builds(
        lambda s, p: f"{s}://host:{p}/db",
        st.sampled_from(["http", "postgresql", "mysql+pymysql"]),
        st.one_of(PLAIN.filter(lambda t: not t.isdigit()), st.integers(min_value=65536).map(str)),
    ),  # a bad port
    st.builds(
        lambda s, t: f"{s}://[{t}", st.sampled_from(["http", "https", "postgresql"]), PLAIN
    ),  # a broken IPv6 host
    st.sampled_from(
        ["http://", "https://", "http:///mlflow", "", " ", " sqlite:///x.db", "sqlite:///x.db\n", "postgresql+://x"]
    ),
)


@examples(60)
@given(
    MALFORMED, st.sampled_from(["run-tracking", "tune-storage", "tune-tracking", "report-storage", "report-tracking"])
)
def test_a_malformed_store_url_exits_2(offline, url, where):
    command, flag = where.split("-")
    argv = {"run": DRY, "tune": ["tune", EXPERIMENT, "--profile", "smoke"], "report": ["report"]}[command]
    line = error_line(*call([*argv, "--tracking-uri" if flag == "tracking" else "--storage", url]))
    assert ("tracking" if flag == "tracking" else "storage") in line, line


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "a-file").write_text("not a directory")
        yield root


def garbage_batches(root: Path, data: bytes, both: bool) -> Path:
    folder = Path(tempfile.mkdtemp(dir=root)) / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(data)
    if both:
        (folder / "test_batch").write_bytes(data)
    return folder.parent


JUNK = st.one_of(
    st.binary(max_size=200),
    st.builds(
        pickle.dumps,
        st.dictionaries(
            st.sampled_from(["data", "labels", b"data", "x"]),
            st.one_of(st.integers(), st.lists(st.integers(-300, 300), max_size=8), PLAIN),
            max_size=3,
        ),
    ),
    st.builds(
        lambda n, label: pickle.dumps({"data": [[0] * 3072] * n, "labels": [label] * n}),
        st.integers(1, 3),
        st.integers(10, 99),
    ),
)


@examples(40)
@given(
    st.one_of(
        st.builds(lambda: ("empty", b"", False)),
        st.tuples(st.just("garbage"), JUNK, st.booleans()),
        st.builds(lambda: ("file", b"", False)),
    )
)
def test_missing_or_damaged_data_exits_2_naming_the_place(offline, scratch, case):
    kind, data, both = case
    if kind == "empty":
        data_dir = Path(tempfile.mkdtemp(dir=scratch))
    elif kind == "file":
        data_dir = scratch / "a-file"
    else:
        data_dir = garbage_batches(scratch, data, both)
    line = error_line(*call(["run", EXPERIMENT, "--device", "cpu", "--data-dir", str(data_dir)]))
    assert str(data_dir) in line, line
    assert not (offline / "mlflow.db").exists()


@examples(30)
@given(
    st.sampled_from(
        [
            [*DRY, "--checkpoint-dir", "{file}/checkpoints"],
            [*DRY, "--checkpoint-dir", "{file}"],
            ["tune", EXPERIMENT, "--profile", "smoke", "--checkpoint-dir", "{file}/x"],
            ["report", "--out", "{file}/report"],
            ["report", "--out", "{file}"],
            [*DRY, "--tracking-uri", "sqlite:///{file}/mlflow.db"],
            ["tune", EXPERIMENT, "--profile", "smoke", "--storage", "sqlite:///{file}/o.db"],
        ]
    ),
    PLAIN,
)
def test_an_unwritable_output_place_exits_2(offline, scratch, argv, tail):
    file = str(scratch / "a-file")
    argv = [a.replace("{file}", file).replace("/x", f"/{tail}") for a in argv]
    line = error_line(*call(argv))
    assert "a-file" in line, line


@pytest.fixture(scope="module")
def experiments_copy():
    """A copy of experiments/ that each example spoils one file of."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "experiments"
        shutil.copytree(config.experiments_dir(), root)
        yield root


def toml_document(tree: dict) -> str:
    top = [f"{k} = {toml(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    tables = [
        f"[{k}]\n" + "\n".join(f"{kk} = {toml(vv)}" for kk, vv in v.items())
        for k, v in tree.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


@examples(60)
@given(
    st.one_of(
        st.tuples(st.just("experiment"), bad_assignment()),
        st.tuples(st.just("experiment"), st.text(max_size=40)),
        st.tuples(
            st.just("profile"),
            st.sampled_from(
                [
                    'seeds = "3"',
                    "seeds = 0",
                    "seeds = 2.5",
                    "overrides = 3",
                    "experiments = [1]",
                    "[experiments.x]\nother = 1",
                    "[experiments.x]\noverrides = 1",
                    "[overrides]\ndata = 5",
                    "[overrides.optim]\nlr = -1",
                    "[overrides.data]\nnope = 1",
                    "seeds = [",
                ]
            ),
        ),
        st.tuples(
            st.just("suites"),
            st.sampled_from(["[all]\nexperiments = 1", "[all]\n", "all = 3", "[all]\nexperiments = [1, 2]", "[all"]),
        ),
    )
)
def test_a_bad_experiment_profile_or_suite_file_exits_2(offline, experiments_copy, monkeypatch, case):
    kind, spoil = case
    monkeypatch.setenv("BENCH_EXPERIMENTS", str(experiments_copy))
    custom = experiments_copy / "custom.toml"
    profile = experiments_copy / "profiles" / "custom.toml"
    suites = experiments_copy / "suites.toml"
    original = suites.read_text()
    try:
        if kind == "experiment":
            if isinstance(spoil, tuple):
                tree = config.read_toml(experiments_copy / f"{EXPERIMENT}.toml")
                key, value = spoil
                *parents, leaf = key.split(".")
                node = tree
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
                custom.write_text(toml_document(tree))
            else:
                custom.write_text(spoil)
            argv = ["run", "custom", "--profile", "paper", "--dry-run"]  # paper overrides nothing
            if custom.read_text() and not isinstance(spoil, tuple):
                try:
                    config.validate({**config.read_toml(custom), "experiment": "custom"}, "x")
                    return  # text that happens to be a valid experiment: not a mistake
                except config.UserError:
                    pass
        elif kind == "profile":
            profile.write_text(spoil + "\n")
            argv = ["run", EXPERIMENT, "--profile", "custom", "--dry-run"]
        else:
            suites.write_text(spoil + "\n")
            argv = ["run", "--suite", "all", "--dry-run"]
        line = error_line(*call(argv))
        assert "custom" in line or "suites.toml" in line, line
    finally:
        custom.unlink(missing_ok=True)
        profile.unlink(missing_ok=True)
        suites.write_text(original)


# --- as a process: the same one line, no traceback, on the real stderr -----------------------------


@pytest.mark.parametrize(
    "args, names",
    [
        (["run", EXPERIMENT, "--profile", "smoke", "--set", "optim.lr=true", "--dry-run"], ["optim.lr"]),
        (
            ["run", EXPERIMENT, "--profile", "smoke", "--tracking-uri", "http://127.0.0.1:9"],
            ["http://127.0.0.1:9", "does not answer"],
        ),
    ],
)
@pytest.mark.slow
def test_as_a_process_exits_2_with_one_line(args, names, tmp_path, subprocess_env):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=tmp_path,
        env=subprocess_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = error_line(proc.returncode, proc.stdout, proc.stderr)
    for name in names:
        assert name in line, line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "checkpoints").exists()


def test_model_options_that_build_but_do_not_fit_exit_2_before_training(offline):
    line = error_line(
        *call(["run", "hw4-resnet-cifar100", "--profile", "smoke", "--device", "cpu", "--set", "model.blocks=[1,1]"])
    )
    assert "model.blocks=(1, 1)" in line, line
    assert not (offline / "mlflow.db").exists() and not (offline / "checkpoints").exists()
