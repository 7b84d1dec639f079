import os
import shutil
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from bench.errors import UserError
from bench.models import count_parameters, create_model, list_models, model_options
from bench.models.resnet18_finetune import imagenet_weights_file

IMAGENET_FILE = "resnet18-f37072fd.pth"


def _kwargs(name):
    # resnet18_finetune defaults to the ImageNet weights, which cannot be fetched here.
    return {"weights": "none"} if name == "resnet18_finetune" else {}


def _meta_model(name, **kw):
    """The model on the meta device: shapes and counts without allocating or computing anything."""
    with torch.device("meta"):
        return create_model(name, **kw)


def _flops(model):
    with torch.device("meta"):
        x = torch.empty(1, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model.eval()(x)
    return counter.get_total_flops()


# --- every registered model -------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_output_shape_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    num_classes = 7
    model = create_model(name, num_classes=num_classes, **_kwargs(name)).train()
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 5])
    out = model(x)
    assert out.shape == (2, num_classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Cross entropy touches every logit and, unlike out.sum(), does not vanish through BatchNorm.
    F.cross_entropy(out, y).backward()
    params = dict(model.named_parameters())
    assert params
    missing = [n for n, p in params.items() if p.grad is None]
    assert missing == []
    not_finite = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
    assert not_finite == []
    all_zero = [n for n, p in params.items() if not p.grad.any()]
    assert all_zero == []


@pytest.mark.parametrize("name", list_models())
def test_num_classes_sets_the_head(name):
    model = _meta_model(name, num_classes=13, **_kwargs(name))
    assert model.fc.out_features == 13


# --- pinned parameter counts (SPEC) -----------------------------------------------------------


def test_hw4_resnet_has_the_reported_parameter_count():
    assert count_parameters(_meta_model("hw4_resnet", num_classes=100)) == 3_903_620


def test_resnet18_finetune_has_the_reported_parameter_count():
    assert count_parameters(_meta_model("resnet18_finetune", num_classes=100, weights="none")) == 11_227_812


def test_bottleneck_and_resnet_b_have_equal_parameter_counts():
    a = count_parameters(_meta_model("bottleneck_resnet", num_classes=10))
    b = count_parameters(_meta_model("resnet_b", num_classes=10))
    assert a == b
    # Counted by hand from SPEC R3: stem 3->32, 3 stages x 3 bottlenecks, widths 32/64/128 x4, fc 512->10.
    assert a == 1_236_522


def test_resnet_b_has_more_flops_than_the_bottleneck():
    bottleneck = _flops(_meta_model("bottleneck_resnet", num_classes=10))
    resnet_b = _flops(_meta_model("resnet_b", num_classes=10))
    assert bottleneck > 0
    assert resnet_b > bottleneck


# --- hw4_resnet quirk switches ----------------------------------------------------------------


def test_hw4_defaults_are_the_reported_quirks():
    options = model_options("hw4_resnet")
    assert options["post_add_relu"] is False
    assert options["shortcut_kernel"] == 3
    assert options["stem_dropout"] == pytest.approx(0.02)


def _small_hw4(**kw):
    # Two stages on an 8-px input leave the 4x4 map the author's MaxPool2d(4, stride=1) expects.
    return create_model("hw4_resnet", num_classes=5, blocks=(1, 1), widths=(8, 16), stem_width=8, **kw)


def test_hw4_post_add_relu_changes_the_outputs():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = {}
    for relu in (False, True):
        torch.manual_seed(0)
        model = _small_hw4(post_add_relu=relu).eval()
        with torch.no_grad():
            outs[relu] = model(x)
    # Same seed, same parameters: only the switch differs.
    torch.manual_seed(0)
    a = _small_hw4(post_add_relu=False)
    torch.manual_seed(0)
    b = _small_hw4(post_add_relu=True)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert outs[False].shape == outs[True].shape == (2, 5)
    assert not torch.allclose(outs[False], outs[True])


def test_hw4_post_add_relu_true_makes_block_outputs_non_negative():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for relu, expect_negative in ((True, False), (False, True)):
        model = _small_hw4(post_add_relu=relu).eval()
        with torch.no_grad():
            feats = model.stages(model.stem(x))
        assert bool((feats < 0).any()) is expect_negative


def test_hw4_shortcut_kernel_one_changes_the_parameter_count():
    three = count_parameters(_meta_model("hw4_resnet", num_classes=100, shortcut_kernel=3))
    one = count_parameters(_meta_model("hw4_resnet", num_classes=100, shortcut_kernel=1))
    # Projection shortcuts 32->64, 64->128, 128->256 lose 8 of their 9 kernel taps.
    assert three - one == 8 * (32 * 64 + 64 * 128 + 128 * 256)


def test_hw4_shortcut_kernel_one_keeps_the_output_shape():
    model = create_model("hw4_resnet", num_classes=5, blocks=(1, 1), widths=(8, 16), stem_width=8, shortcut_kernel=1)
    assert model.eval()(torch.randn(1, 3, 8, 8)).shape == (1, 5)


# --- resnet18_finetune weights ----------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_state(tmp_path_factory):
    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_weights_from_a_local_state_dict_file(resnet18_state):
    path, state = resnet18_state
    model = create_model("resnet18_finetune", num_classes=100, weights=str(path))
    got = model.state_dict()
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.bn1.running_mean", "bn1.bias"):
        assert torch.equal(got[key], state[key]), key
    assert model.fc.in_features == 512
    assert model.fc.out_features == 100
    assert model.fc.weight.shape == (100, 512)
    # The equality means something: a random init does not reproduce the saved tensor.
    torch.manual_seed(999)
    other = create_model("resnet18_finetune", num_classes=100, weights="none")
    assert not torch.equal(other.conv1.weight, state["conv1.weight"])


def test_freeze_backbone_trains_only_the_head(resnet18_state):
    path, _ = resnet18_state
    model = create_model("resnet18_finetune", num_classes=10, weights=str(path), freeze_backbone=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}


def test_missing_weights_file_is_a_user_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match="does not exist") as info:
        create_model("resnet18_finetune", num_classes=100, weights=str(missing))
    assert str(missing) in str(info.value)


def test_garbage_weights_file_is_a_user_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch file \x00\x01\x02" * 10)
    with pytest.raises(UserError, match="not a readable state dict") as info:
        create_model("resnet18_finetune", num_classes=100, weights=str(path))
    assert str(path) in str(info.value)


def test_state_dict_with_wrong_keys_is_a_user_error(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(UserError, match="does not fit ResNet-18"):
        create_model("resnet18_finetune", num_classes=100, weights=str(path))


def test_state_dict_with_a_wrong_head_is_a_user_error(tmp_path, resnet18_state):
    _, state = resnet18_state
    state = dict(state)
    state["fc.weight"] = torch.zeros(10, 512)
    state["fc.bias"] = torch.zeros(10)
    path = tmp_path / "ten_classes.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="does not fit ResNet-18"):
        create_model("resnet18_finetune", num_classes=100, weights=str(path))


def test_weights_file_holding_a_tensor_is_a_user_error(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError):
        create_model("resnet18_finetune", num_classes=100, weights=str(path))


def _no_network(calls):
    def fail(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError("network is unreachable (test)")

    return fail


def test_imagenet_weights_offline_is_a_user_error_naming_the_file(tmp_path, monkeypatch):
    torch_home = tmp_path / "torch_home"
    torch_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    calls = []
    # torchvision's weights API imports the hub function by name; patch both bindings.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_network(calls))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", _no_network(calls))
    with pytest.raises(UserError) as info:
        create_model("resnet18_finetune", num_classes=100, weights="imagenet")
    message = str(info.value)
    assert calls, "the ImageNet path never tried to fetch the weights"
    assert IMAGENET_FILE in message
    assert str(torch_home) in message
    assert imagenet_weights_file() == torch_home / "hub" / "checkpoints" / IMAGENET_FILE


def test_imagenet_weights_load_from_the_torch_home_cache(tmp_path, monkeypatch, resnet18_state):
    path, state = resnet18_state
    torch_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    cached = imagenet_weights_file()
    assert cached.parent == torch_home / "hub" / "checkpoints"
    cached.parent.mkdir(parents=True)
    shutil.copyfile(path, cached)
    calls = []
    # A cached file must not touch the network.
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network(calls))
    model = create_model("resnet18_finetune", num_classes=100, weights="imagenet")
    assert calls == []
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert model.fc.out_features == 100
    assert os.path.getsize(cached) == os.path.getsize(path)
