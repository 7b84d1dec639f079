"""Checkpoint files: atomic, checksummed, the previous "last" kept; a damaged newest one falls back."""

import logging
import os
import pickle
import shutil
import signal

import pytest
import torch

from bench import process
from bench.engine import checkpoint, stops


def test_save_then_load_round_trips_tensors_and_plain_values(tmp_path):
    state = {
        "epoch": 3,
        "model": {"w": torch.arange(6.0).view(2, 3)},
        "best": (2, 0.5, 0.4),
        "rng": torch.get_rng_state(),
    }
    path = tmp_path / "sub" / "last.pt"
    checkpoint.save(state, path)
    loaded = checkpoint.load(path)
    assert loaded["epoch"] == 3
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert tuple(loaded["best"]) == (2, 0.5, 0.4)
    assert torch.equal(loaded["rng"], state["rng"])
    # The checksum trailer does not stop a plain torch.load (the README's promise).
    assert torch.load(path, weights_only=True)["epoch"] == 3


def test_save_leaves_no_temporary_file_and_replaces_the_old_one(tmp_path):
    path = tmp_path / "best.pt"
    checkpoint.save({"epoch": 1}, path)
    checkpoint.save({"epoch": 2}, path)
    assert sorted(os.listdir(tmp_path)) == ["best.pt"]
    assert checkpoint.load(path)["epoch"] == 2


def test_rotation_keeps_exactly_the_last_two(tmp_path):
    path = tmp_path / "last.pt"
    assert checkpoint.load_latest(path) is None
    for epoch in range(1, 5):
        checkpoint.save_rotating({"epoch": epoch}, path)
        assert checkpoint.load_latest(path)["epoch"] == epoch
    assert sorted(os.listdir(tmp_path)) == ["last.prev.pt", "last.pt"]
    assert checkpoint.load(path)["epoch"] == 4
    assert checkpoint.load(tmp_path / "last.prev.pt")["epoch"] == 3


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x10  # inside the archive: torch.load alone may not notice
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [(truncate, "no checksum"), (flip_a_bit, "checksum mismatch")])
def test_a_damaged_latest_checkpoint_is_detected_and_the_previous_one_used(damage, why, tmp_path, caplog):
    path = tmp_path / "last.pt"
    checkpoint.save_rotating({"epoch": 1, "w": torch.randn(64)}, path)
    checkpoint.save_rotating({"epoch": 2, "w": torch.randn(64)}, path)
    damage(path)
    with pytest.raises(checkpoint.CorruptCheckpoint, match=why):
        checkpoint.load(path)
    with caplog.at_level(logging.WARNING, logger="bench.engine.checkpoint"):
        state = checkpoint.load_latest(path)
    assert state["epoch"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in w and why in w for w in warnings), warnings
    assert any("last.prev.pt" in w for w in warnings), warnings


def test_a_copy_of_the_file_verifies_where_it_lands(tmp_path):
    """MLflow uploads last.pt and another machine downloads the same bytes: the checksum is inside."""
    checkpoint.save_rotating({"epoch": 5}, tmp_path / "a" / "last.pt")
    (tmp_path / "b").mkdir()
    shutil.copyfile(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    assert checkpoint.load_latest(tmp_path / "b" / "last.pt")["epoch"] == 5


def test_when_every_checkpoint_is_damaged_the_error_names_them(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_rotating({"epoch": 1, "w": torch.randn(64)}, path)
    checkpoint.save_rotating({"epoch": 2, "w": torch.randn(64)}, path)
    truncate(path)
    flip_a_bit(tmp_path / "last.prev.pt")
    with pytest.raises(checkpoint.CorruptCheckpoint) as info:
        checkpoint.load_latest(path)
    message = str(info.value)
    for text in (
        "no usable checkpoint",
        "last.pt: no checksum",
        "last.prev.pt: checksum mismatch",
        "delete the directory",
    ):
        assert text in message, message


def test_a_crash_between_the_renames_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_rotating({"epoch": 1}, path)
    checkpoint.save_rotating({"epoch": 2}, path)
    os.replace(path, tmp_path / "last.prev.pt")  # the first rename of the next save, then the crash
    assert checkpoint.load_latest(path)["epoch"] == 2


class Custom:
    pass


def test_load_refuses_arbitrary_python_objects(tmp_path):
    path = tmp_path / "evil.pt"
    checkpoint.save({"obj": Custom()}, path)  # a valid checksum does not make a pickle safe
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        checkpoint.load(path)
    torch.save({"obj": Custom()}, path)
    with pytest.raises(checkpoint.CorruptCheckpoint):
        checkpoint.load(path)


def test_the_saver_writes_a_snapshot_in_order_and_hands_back_what_is_written(tmp_path):
    saver = checkpoint.Saver()
    weights = torch.zeros(1000)
    for epoch in (1, 2, 3):
        weights += 1
        saver.submit(checkpoint.save_rotating, {"epoch": epoch, "w": weights}, tmp_path / "last.pt", epoch)
    weights += 100  # training goes on: the queued copies must not see it
    assert saver.done(keep=0) == [1, 2, 3]
    assert saver.done() == []
    saver.close()
    last, prev = checkpoint.load(tmp_path / "last.pt"), checkpoint.load(checkpoint.previous(tmp_path / "last.pt"))
    assert last["epoch"] == 3 and torch.equal(last["w"], torch.full((1000,), 3.0))
    assert prev["epoch"] == 2


def test_the_saver_raises_a_failed_write_and_close_waits_for_the_rest(tmp_path):
    (tmp_path / "not-a-dir").write_text("a file where a directory should be")
    saver = checkpoint.Saver()
    saver.submit(checkpoint.save, {"epoch": 1}, tmp_path / "not-a-dir" / "x.pt", "bad")
    saver.submit(checkpoint.save, {"epoch": 2}, tmp_path / "ok.pt", "good")
    with pytest.raises(OSError):
        saver.close()
    assert checkpoint.load(tmp_path / "ok.pt")["epoch"] == 2


@pytest.mark.parametrize("save", [checkpoint.save, checkpoint.save_rotating])
@pytest.mark.parametrize("signum, stop", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, process.Terminated)])
def test_a_stop_signal_in_the_middle_of_a_write_comes_once_the_checkpoint_is_whole(
    save, signum, stop, tmp_path, monkeypatch
):
    """Raised inside torch.save, a KeyboardInterrupt comes out of its zip writer as a RuntimeError
    ("unexpected pos"): the cell would fail instead of stopping. The stop waits for the write."""
    state = {"epoch": 4, "w": torch.arange(50_000.0)}  # large enough to be written in several pieces
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 3}, path)
    real, writes = checkpoint._Hashing.write, []

    def write(self, data):
        writes.append(len(data))
        if len(writes) == 2:
            signal.raise_signal(signum)  # its handler runs at the next bytecode, in the middle of torch.save
        return real(self, data)

    monkeypatch.setattr(checkpoint._Hashing, "write", write)
    with process.stopping_on_sigterm():
        with pytest.raises(stop):
            save(state, path)
        handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert len(writes) > 2  # the write went on after the signal
    loaded = checkpoint.load(path)
    assert loaded["epoch"] == 4 and torch.equal(loaded["w"], state["w"])
    assert not path.with_name(path.name + ".tmp").exists()
    # The handlers are given back (the command's SIGTERM handler puts itself aside once it has run).
    assert handlers == (signal.default_int_handler, signal.SIG_IGN if signum == signal.SIGTERM else process.terminated)


def test_ctrl_c_again_at_a_write_that_hangs_abandons_it(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 3}, path)
    real, writes = checkpoint._Hashing.write, []

    def write(self, data):
        writes.append(len(data))
        if len(writes) in (2, 4):  # a first Ctrl-C, and a second one INSIST_AFTER_S later
            signal.raise_signal(signal.SIGINT)
        return real(self, data)

    monkeypatch.setattr(checkpoint._Hashing, "write", write)
    monkeypatch.setattr(stops, "INSIST_AFTER_S", 0.0)
    with pytest.raises(Exception) as stopped:
        checkpoint.save_rotating({"epoch": 4, "w": torch.arange(50_000.0)}, path)
    assert len(writes) == 4  # abandoned at the second
    assert isinstance(stops.within(stopped.value), KeyboardInterrupt)  # torch's error, made of the stop
    assert checkpoint.load_latest(path)["epoch"] == 3  # the checkpoint before is untouched
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_left_in_place_by_a_cut_short_restore_acts_as_the_one_it_stands_for(monkeypatch):
    # A stop that lands between putting back SIGINT's handler and SIGTERM's leaves the stand-in
    # installed for SIGTERM: the next SIGTERM must still stop the command, not be noted forever.
    real = signal.signal

    def cut_short(signum, handler):
        if signum == signal.SIGTERM and getattr(handler, "__name__", "") != "note":
            monkeypatch.setattr(signal, "signal", real)
            raise KeyboardInterrupt  # the SIGINT that came just then
        return real(signum, handler)

    with process.stopping_on_sigterm():
        monkeypatch.setattr(signal, "signal", cut_short)
        with pytest.raises(KeyboardInterrupt):
            with stops.held():
                pass
        assert signal.getsignal(signal.SIGTERM).__name__ == "note"
        with pytest.raises(process.Terminated):
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # cli's handler ran, and put itself aside
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
