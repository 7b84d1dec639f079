import os
import pickle

import pytest
import torch

from bench import checkpoint


def test_save_then_load_round_trips_tensors_and_plain_values(tmp_path):
    state = {"epoch": 3, "model": {"w": torch.arange(6.0).view(2, 3)}, "best": (2, 0.5, 0.4), "rng": torch.get_rng_state()}
    path = tmp_path / "sub" / "last.pt"
    checkpoint.save(state, path)
    loaded = checkpoint.load(path)
    assert loaded["epoch"] == 3
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert tuple(loaded["best"]) == (2, 0.5, 0.4)
    assert torch.equal(loaded["rng"], state["rng"])


def test_save_leaves_no_temporary_file_and_replaces_the_old_one(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"epoch": 1}, path)
    checkpoint.save({"epoch": 2}, path)
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]
    assert checkpoint.load(path)["epoch"] == 2


class Custom:
    pass


def test_load_refuses_arbitrary_python_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Custom()}, path)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        checkpoint.load(path)
