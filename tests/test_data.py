import logging
import math
import pickle
import urllib.error
from collections import Counter

import numpy as np
import pytest
import scipy.stats
import torch
import torchvision
from torchvision.transforms import Compose, RandomCrop, RandomHorizontalFlip, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from bench.config import DataConfig
from bench.data import build, split_validation
from bench.data.augment import (
    random_crop_flip,
    random_resized_crop_flip,
    resample_boxes,
    resize,
    resized_crop_boxes,
)
from bench.data.cifar import Split, load_cifar, read_layout
from bench.errors import UserError

CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


# --- fixture files in the official python-pickle layout ----------------------------------------


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def _pixels(n, offset):
    """n x 3072 uint8 rows; row i is filled with a pattern unique to (offset + i)."""
    base = np.arange(3072, dtype=np.int64)[None, :] * 7 + (np.arange(n)[:, None] + offset) * 31
    return (base % 251).astype(np.uint8)


def write_cifar10(root, counts, meta=True):
    """counts: file name -> number of images. Labels of file k, image i: (offset + i) % 10."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    offset = 0
    for fname, n in counts.items():
        labels = [(offset + i) % 10 for i in range(n)]
        _dump(folder / fname, {"batch_label": fname, "labels": labels, "data": _pixels(n, offset), "filenames": []})
        offset += n
    if meta:
        _dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 10000})
    return folder


def write_cifar100(root, n_train, n_test):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for fname, n, offset in (("train", n_train, 0), ("test", n_test, 1000)):
        fine = [(offset + 3 * i) % 100 for i in range(n)]
        _dump(
            folder / fname, {"fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": _pixels(n, offset)}
        )
    _dump(
        folder / "meta",
        {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"k{i}" for i in range(20)]},
    )
    return folder


# --- reading the layout -----------------------------------------------------------------------


def test_read_layout_pixel_order_is_channel_planes_then_rows(tmp_path):
    folder = write_cifar10(tmp_path, {"data_batch_1": 3, "test_batch": 2})
    data = np.zeros((3, 3072), dtype=np.uint8)
    data[0, :1024] = 255  # image 0: the R plane
    data[1, 1024 + 32 * 5 + 7] = 77  # image 1: G, row 5, column 7
    data[2, 2048 + 32 * 31 + 0] = 9  # image 2: B, row 31, column 0
    _dump(folder / "data_batch_1", {"labels": [4, 0, 9], "data": data})
    files = read_layout("cifar10", tmp_path)
    images = files.train.images
    assert images.shape == (3, 3, 32, 32)
    assert images.dtype == torch.uint8
    assert (images[0, 0] == 255).all()
    assert (images[0, 1:] == 0).all()
    assert images[1, 1, 5, 7] == 77
    assert images[1].sum() == 77
    assert images[2, 2, 31, 0] == 9
    assert images[2].sum() == 9
    assert files.train.labels.tolist() == [4, 0, 9]
    assert files.train.labels.dtype == torch.int64


def test_read_layout_reads_all_cifar10_files_in_order_with_labels_and_classes(tmp_path):
    counts = dict(zip(CIFAR10_FILES, [3, 2, 4, 1, 2, 5]))
    write_cifar10(tmp_path, counts)
    files = read_layout("cifar10", tmp_path)
    assert len(files.train) == 12
    assert len(files.test) == 5
    assert files.train.labels.tolist() == [i % 10 for i in range(12)]
    assert files.test.labels.tolist() == [(12 + i) % 10 for i in range(5)]
    expected = torch.from_numpy(_pixels(12, 0)).view(12, 3, 32, 32)
    assert torch.equal(files.train.images, expected)
    assert files.classes == [f"c{i}" for i in range(10)]
    assert files.complete is False  # the md5 check fails on fixture files
    assert files.location == str(tmp_path / "cifar-10-batches-py")


def test_read_layout_cifar100_uses_fine_labels(tmp_path):
    write_cifar100(tmp_path, n_train=6, n_test=4)
    files = read_layout("cifar100", tmp_path)
    assert files.train.images.shape == (6, 3, 32, 32)
    assert files.train.labels.tolist() == [0, 3, 6, 9, 12, 15]
    assert files.test.labels.tolist() == [0, 3, 6, 9]
    assert len(files.classes) == 100 and files.classes[42] == "f42"


def test_read_layout_without_a_test_file_is_a_user_error(tmp_path):
    write_cifar10(tmp_path, {"data_batch_1": 2})
    with pytest.raises(UserError, match="no train or no test file"):
        read_layout("cifar10", tmp_path)


def test_partial_layout_loads_with_a_warning_giving_the_counts(tmp_path, caplog):
    write_cifar10(tmp_path, {"data_batch_1": 7, "test_batch": 3}, meta=False)
    with caplog.at_level(logging.WARNING, logger="bench.data.cifar"):
        files = load_cifar("cifar10", tmp_path, download=False)
    assert len(files.train) == 7 and len(files.test) == 3
    assert files.complete is False
    assert files.classes == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "7 train" in message and "3 test" in message
    assert "partial" in message


def test_partial_layout_does_not_try_to_download(tmp_path, monkeypatch):
    write_cifar10(tmp_path, {"data_batch_1": 2, "test_batch": 2})
    calls = []
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", lambda *a, **k: calls.append(a))
    files = load_cifar("cifar10", tmp_path, download=True)
    assert calls == []
    assert len(files.train) == 2


@pytest.mark.parametrize("make_folder", [False, True])
def test_missing_data_without_download_is_a_user_error(tmp_path, make_folder):
    if make_folder:
        (tmp_path / "cifar-10-batches-py").mkdir()  # present but empty
    with pytest.raises(UserError) as info:
        load_cifar("cifar10", tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "cifar-10-python.tar.gz" in message
    assert "--profile smoke" in message


def test_missing_cifar100_names_its_archive(tmp_path):
    with pytest.raises(UserError, match="cifar-100-python.tar.gz"):
        load_cifar("cifar100", tmp_path, download=False)


def test_download_failure_offline_is_a_user_error(tmp_path, monkeypatch):
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable (test)")

    # The lowest torchvision download step: download_and_extract_archive -> download_url.
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", no_network)
    with pytest.raises(UserError) as info:
        load_cifar("cifar10", tmp_path, download=True)
    message = str(info.value)
    assert calls and calls[0].endswith("cifar-10-python.tar.gz")
    assert "download failed" in message
    assert "cifar-10-python.tar.gz" in message
    assert str(tmp_path) in message
    assert "--profile smoke" in message


@pytest.mark.parametrize(
    "name, n_train, n_test, n_classes",
    [("cifar10", 1000, 500, 10), ("cifar100", 1117, 496, 100)],
)
def test_embedded_subset_loads(name, n_train, n_test, n_classes):
    files = load_cifar(name, None)
    assert files.train.images.shape == (n_train, 3, 32, 32)
    assert files.test.images.shape == (n_test, 3, 32, 32)
    assert files.train.images.dtype == torch.uint8
    assert len(files.train.labels) == n_train and len(files.test.labels) == n_test
    assert set(files.train.labels.tolist()) == set(range(n_classes))
    assert set(files.test.labels.tolist()) == set(range(n_classes))
    assert len(files.classes) == n_classes
    # Real photographs, not blank arrays.
    assert files.train.images.float().std() > 30


def test_embedded_cifar10_is_class_balanced():
    files = load_cifar("cifar10", None)
    assert Counter(files.train.labels.tolist()) == {c: 100 for c in range(10)}
    assert Counter(files.test.labels.tolist()) == {c: 50 for c in range(10)}
    assert files.classes[0] == "airplane"


# --- validation split -------------------------------------------------------------------------


def _numbered_split(n):
    images = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1).expand(n, 3, 2, 2).to(torch.uint8).clone()
    return Split(images, torch.arange(n))


def test_split_validation_sizes_and_disjoint():
    train, val = split_validation(_numbered_split(200), 30, split_seed=0)
    assert len(train) == 170 and len(val) == 30
    t, v = set(train.labels.tolist()), set(val.labels.tolist())
    assert not t & v
    assert t | v == set(range(200))
    # Images travel with their labels.
    assert torch.equal(val.images[:, 0, 0, 0].long(), val.labels)
    assert torch.equal(train.images[:, 0, 0, 0].long(), train.labels)


def test_split_validation_is_deterministic_per_split_seed():
    full = _numbered_split(200)
    a = split_validation(full, 30, split_seed=0)[1].labels
    b = split_validation(full, 30, split_seed=0)[1].labels
    c = split_validation(full, 30, split_seed=1)[1].labels
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # A random draw, not the first or last images.
    assert a.tolist() != list(range(30)) and a.tolist() != list(range(170, 200))


def test_split_validation_rejects_a_val_size_as_large_as_the_train_set():
    full = _numbered_split(20)
    for size in (20, 21):
        with pytest.raises(UserError, match=f"val_size={size}"):
            split_validation(full, size, split_seed=0)
    train, val = split_validation(full, 19, split_seed=0)
    assert len(train) == 1 and len(val) == 19


def test_split_validation_zero_gives_no_validation_split():
    full = _numbered_split(20)
    train, val = split_validation(full, 0, split_seed=0)
    assert val is None
    assert train is full


# --- augmentation: random crop + flip ---------------------------------------------------------


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _crop_candidates(image, padding):
    """Every window of the zero-padded image, unflipped and flipped: ((top, left, flip), window)."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    out = []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            window = padded[:, top : top + h, left : left + w]
            out.append(((top, left, False), window))
            out.append(((top, left, True), window.flip(-1)))
    return out


def _identify_crops(outputs, image, padding):
    """(top, left, flip) of each output; asserts each is exactly one window of the padded image."""
    cands = _crop_candidates(image, padding)
    stack = torch.stack([c for _, c in cands])  # K x C x H x W
    match = (outputs[:, None] == stack[None]).flatten(2).all(2)  # N x K
    assert (match.sum(1) == 1).all(), "an output is not exactly one window of the zero-padded image"
    return [cands[k][0] for k in match.int().argmax(1).tolist()]


def test_random_crop_flip_outputs_are_windows_of_the_padded_image_with_own_draws():
    image = (torch.arange(3 * 8 * 8) % 250 + 1).to(torch.uint8).view(3, 8, 8)
    batch = image.expand(64, 3, 8, 8).clone()
    out = random_crop_flip(batch, 2, _gen(0))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    params = _identify_crops(out, image, 2)
    # Identical inputs, different outputs: each image draws its own offset and flip.
    assert len(set(params)) > 20
    assert len({p[:2] for p in params}) > 10


def test_random_crop_flip_offsets_are_uniform_and_flips_are_half():
    padding, n = 2, 5000
    image = (torch.arange(16) + 1).to(torch.uint8).view(1, 4, 4)
    out = random_crop_flip(image.expand(n, 1, 4, 4).clone(), padding, _gen(1))
    params = _identify_crops(out, image, padding)
    tops = Counter(p[0] for p in params)
    lefts = Counter(p[1] for p in params)
    flips = sum(p[2] for p in params)
    expected = n / (2 * padding + 1)
    for counts in (tops, lefts):
        assert sorted(counts) == list(range(2 * padding + 1))
        chi2 = sum((counts[k] - expected) ** 2 / expected for k in counts)
        assert chi2 < 18.5  # 4 degrees of freedom, p ~ 0.001
    assert 0.46 * n < flips < 0.54 * n
    # Flip is independent of the offset: both occur at every top offset.
    for top in range(2 * padding + 1):
        assert {p[2] for p in params if p[0] == top} == {False, True}


def test_random_crop_flip_draws_offsets_and_flips_as_torchvision_does():
    """A two-sample chi-square test on (top, left, flip): ours against torchvision's per-sample
    RandomCrop(padding) + RandomHorizontalFlip on the same image."""
    padding, n = 2, 4000
    image = (torch.arange(16) + 1).to(torch.uint8).view(1, 4, 4)
    ours = _identify_crops(random_crop_flip(image.expand(n, 1, 4, 4).clone(), padding, _gen(11)), image, padding)
    torch.manual_seed(11)
    reference = Compose([RandomCrop(4, padding=padding), RandomHorizontalFlip()])
    theirs = _identify_crops(torch.stack([reference(image) for _ in range(n)]), image, padding)
    cells = sorted(set(ours) | set(theirs))
    table = [[Counter(ours)[c] for c in cells], [Counter(theirs)[c] for c in cells]]
    assert len(cells) == (2 * padding + 1) ** 2 * 2
    assert scipy.stats.chi2_contingency(table).pvalue > 0.001


def test_resized_crop_areas_and_aspects_follow_torchvision_two_sample():
    n, size = 3000, 32
    boxes = resized_crop_boxes(n, size, size, _gen(12), torch.device("cpu"))
    torch.manual_seed(12)
    img = torch.zeros(3, size, size)
    tv = torch.tensor(
        [RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], dtype=torch.float
    )
    for ours, theirs in (
        (boxes[:, 2] * boxes[:, 3], tv[:, 2] * tv[:, 3]),  # area
        (boxes[:, 3] / boxes[:, 2], tv[:, 3] / tv[:, 2]),  # aspect
        (boxes[:, 0], tv[:, 0]),  # where: top
    ):
        assert scipy.stats.ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 0.001


def test_random_crop_flip_without_padding_only_flips():
    image = torch.randint(0, 256, (3, 6, 6), dtype=torch.uint8, generator=_gen(5))
    out = random_crop_flip(image.expand(200, 3, 6, 6).clone(), 0, _gen(2))
    same = (out == image).flatten(1).all(1)
    flipped = (out == image.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all()
    assert 60 < int(flipped.sum()) < 140


def test_random_crop_flip_is_reproducible_from_the_generator_seed():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=_gen(3))
    a = random_crop_flip(images, 4, _gen(7))
    b = random_crop_flip(images, 4, _gen(7))
    c = random_crop_flip(images, 4, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --- augmentation: random resized crop + flip -------------------------------------------------


def test_resized_crop_boxes_lie_inside_with_valid_area_and_aspect():
    n, size = 4000, 32
    boxes = resized_crop_boxes(n, size, size, _gen(0), torch.device("cpu"))
    assert boxes.shape == (n, 4)
    top, left, h, w = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())  # whole pixels
    assert (top >= 0).all() and (left >= 0).all()
    assert (h >= 1).all() and (w >= 1).all()
    assert (top + h <= size).all() and (left + w <= size).all()
    # Sides are rounded from sqrt(area * ratio): allow half a pixel on each side.
    area = size * size
    assert ((w + 0.5) * (h + 0.5) >= 0.08 * area).all()
    assert ((w - 0.5) * (h - 0.5) <= 1.0 * area).all()
    assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
    # Per-image variety, across the whole scale range.
    assert len({tuple(b) for b in boxes.tolist()}) > n // 4
    frac = h * w / area
    assert frac.min() < 0.12 and frac.max() > 0.9
    assert len(set(top.tolist())) > 20 and len(set(left.tolist())) > 20


def test_resized_crop_boxes_match_torchvision_in_distribution():
    n, size = 3000, 32
    boxes = resized_crop_boxes(n, size, size, _gen(1), torch.device("cpu"))
    ours_area = (boxes[:, 2] * boxes[:, 3] / size**2).mean().item()
    ours_log_aspect = torch.log(boxes[:, 3] / boxes[:, 2]).mean().item()
    torch.manual_seed(1)
    img = torch.zeros(3, size, size)
    tv = torch.tensor(
        [RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)], dtype=torch.float
    )
    tv_area = (tv[:, 2] * tv[:, 3] / size**2).mean().item()
    tv_log_aspect = torch.log(tv[:, 3] / tv[:, 2]).mean().item()
    assert ours_area == pytest.approx(tv_area, abs=0.025)
    assert ours_log_aspect == pytest.approx(tv_log_aspect, abs=0.02)
    # Where in the image: the box centre is on average the image centre.
    centre = (boxes[:, 1] + boxes[:, 3] / 2).mean().item()
    assert centre == pytest.approx(size / 2, abs=0.5)


def test_resample_boxes_whole_box_is_identity_and_flip_mirrors():
    images = torch.rand(2, 3, 8, 8, generator=_gen(4))
    whole = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    assert torch.allclose(resample_boxes(images, whole, 8), images, atol=1e-6)
    flip = torch.tensor([True, False])
    out = resample_boxes(images, whole, 8, flip)
    assert torch.allclose(out[0], images[0].flip(-1), atol=1e-6)
    assert torch.allclose(out[1], images[1], atol=1e-6)


def test_resample_boxes_reads_the_box_it_is_given():
    images = torch.rand(2, 3, 32, 32, generator=_gen(6))
    boxes = torch.tensor([[8.0, 8.0, 16.0, 16.0], [0.0, 16.0, 16.0, 16.0]])  # (top, left, h, w)
    out = resample_boxes(images, boxes, 16)
    assert torch.allclose(out[0], images[0, :, 8:24, 8:24], atol=1e-5)
    assert torch.allclose(out[1], images[1, :, 0:16, 16:32], atol=1e-5)


def _torchvision_resized_crops(images, boxes, size, flip):
    """torchvision's own v2 resized_crop (its defaults: bilinear, antialias) and flip, image by image."""
    out = []
    for image, (top, left, h, w), mirror in zip(images, boxes.long().tolist(), flip.tolist()):
        crop = TF.resized_crop(image, top, left, h, w, [size, size])
        out.append(TF.horizontal_flip(crop) if mirror else crop)
    return torch.stack(out)


@pytest.mark.parametrize("extent, size", [(32, 32), (32, 64), (32, 224), (32, 16), (96, 32), (96, 64)])
def test_resample_boxes_matches_torchvision_resized_crop(extent, size):
    """Pixel by pixel, over random boxes: enlarging (the 224-px fine-tune) and shrinking (boxes
    wider than the output, where torchvision antialiases), flips included. Only the box's own
    pixels may enter: one outside it would show at the crop's edges."""
    gen = _gen(20 + extent + size)
    n = 48
    images = torch.rand(n, 3, extent, extent, generator=gen)
    boxes = resized_crop_boxes(n, extent, extent, gen, torch.device("cpu"))
    boxes[0] = torch.tensor([0.0, 0.0, extent, extent])  # the whole image
    boxes[1] = torch.tensor([extent - 1.0, extent - 1.0, 1.0, 1.0])  # the corner pixel
    boxes[2] = torch.tensor([0.0, 5.0, extent, 2.0])  # a two-pixel column inside the image
    boxes[3] = torch.tensor([3.0, 1.0, 7.0, extent - 2.0])  # odd sizes, off every edge
    flip = torch.rand(n, generator=gen) < 0.5
    ours = resample_boxes(images, boxes, size, flip)
    assert ours.shape == (n, 3, size, size)
    torch.testing.assert_close(ours, _torchvision_resized_crops(images, boxes, size, flip), rtol=0, atol=1e-5)


def test_random_resized_crop_flip_shape_and_reproducibility():
    images = torch.rand(6, 3, 32, 32, generator=_gen(8))
    a = random_resized_crop_flip(images, 48, _gen(9))
    b = random_resized_crop_flip(images, 48, _gen(9))
    assert a.shape == (6, 3, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, random_resized_crop_flip(images, 48, _gen(10)))
    # Bilinear resampling stays within the input's range.
    assert a.min() >= images.min() - 1e-6 and a.max() <= images.max() + 1e-6
    # Identical inputs get different crops.
    same = images[:1].expand(6, 3, 32, 32)
    c = random_resized_crop_flip(same, 32, _gen(11))
    assert not torch.allclose(c[0], c[1])


def test_random_resized_crop_flip_flips_about_half_the_images():
    # A left-to-right ramp: an unflipped crop still rises to the right, a flipped one falls.
    ramp = torch.linspace(0, 1, 32).expand(400, 3, 32, 32).clone()
    out = random_resized_crop_flip(ramp, 16, _gen(13))
    slope = out[:, 0, :, -1].mean(1) - out[:, 0, :, 0].mean(1)
    rising, falling = int((slope > 0).sum()), int((slope < 0).sum())
    assert rising + falling == 400
    assert 150 < falling < 250


def test_resize_is_a_no_op_at_the_same_size_and_resizes_otherwise():
    images = torch.rand(2, 3, 32, 32, generator=_gen(12))
    assert resize(images, 32) is images
    big = resize(images, 64)
    assert big.shape == (2, 3, 64, 64)
    assert torch.allclose(big.mean((2, 3)), images.mean((2, 3)), atol=1e-3)


# --- Batches from build() ---------------------------------------------------------------------

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _cfg(**kw):
    base = dict(
        dataset="cifar10", source="embedded", val_size=100, batch_size=64, eval_batch_size=128, mean=MEAN, std=STD
    )
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def embedded10():
    return load_cifar("cifar10", None)


def _to_uint8(x):
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x * std + mean).mul(255).round().to(torch.uint8)


def _epoch(batches):
    xs, ys = zip(*batches)
    return torch.cat(xs), torch.cat(ys)


def test_build_counts_and_batch_shapes(embedded10):
    bundle = build(_cfg(), seed=0, device=torch.device("cpu"), files=embedded10)
    assert bundle.counts == {"train": 900, "val": 100, "test": 500}
    assert bundle.num_classes == 10
    assert bundle.classes == embedded10.classes
    assert bundle.complete is False
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (15, 1, 4)
    sizes = [len(y) for _, y in bundle.train]
    assert sizes == [64] * 14 + [900 - 14 * 64]
    x, y = next(iter(bundle.train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert [len(y) for _, y in bundle.test] == [128, 128, 128, 116]


def test_build_without_validation(embedded10):
    bundle = build(_cfg(val_size=0), seed=0, device=torch.device("cpu"), files=embedded10)
    assert bundle.val is None
    assert bundle.counts == {"train": 1000, "val": 0, "test": 500}


def test_val_and_test_batches_cover_every_image_once_in_order_normalized(embedded10):
    bundle = build(_cfg(), seed=0, device=torch.device("cpu"), files=embedded10)
    _, val = split_validation(embedded10.train, 100, 0)
    for batches, split in ((bundle.val, val), (bundle.test, embedded10.test)):
        for _ in range(2):  # no shuffle: every epoch the same order
            x, y = _epoch(batches)
            assert torch.equal(y, split.labels)
            assert torch.equal(_to_uint8(x), split.images)
    # Normalized with the config's mean and std.
    x, _ = _epoch(bundle.test)
    expected = (embedded10.test.images.float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-5)


def test_resized_batches_are_normalized_as_if_after_the_resize(embedded10):
    """Normalizing before the resize (on the smaller image) gives what normalizing after gives."""
    bundle = build(_cfg(image_size=64), seed=0, device=torch.device("cpu"), files=embedded10)
    x, _ = _epoch(bundle.test)
    assert x.shape[-2:] == (64, 64)
    expected = (resize(embedded10.test.images.float() / 255, 64) - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-5)
    gen = torch.Generator().manual_seed(3)
    crops = build(
        _cfg(image_size=64, augment="resized_crop_flip"), seed=3, device=torch.device("cpu"), files=embedded10
    )
    crops.generator.manual_seed(3)
    x, y = next(iter(crops.train))
    order = torch.randperm(900, generator=gen)[:64]
    train, _ = split_validation(embedded10.train, 100, 0)
    assert torch.equal(y, train.labels[order])
    expected = (random_resized_crop_flip(train.images[order].float() / 255, 64, gen) - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-5)


def _image_keys(images):
    return [bytes(im.numpy().tobytes()) for im in images]


def test_train_batches_cover_every_image_once_and_reshuffle_each_epoch(embedded10):
    bundle = build(_cfg(augment="none"), seed=0, device=torch.device("cpu"), files=embedded10)
    train, _ = split_validation(embedded10.train, 100, 0)
    where = {k: i for i, k in enumerate(_image_keys(train.images))}
    assert len(where) == len(train)  # the embedded images are distinct
    orders = []
    for _ in range(2):
        x, y = _epoch(bundle.train)
        order = [where[k] for k in _image_keys(_to_uint8(x))]
        assert sorted(order) == list(range(len(train)))
        assert torch.equal(y, train.labels[order])
        orders.append(order)
    assert orders[0] != orders[1]
    assert orders[0] != list(range(len(train)))


def test_train_batches_are_augmented(embedded10):
    bundle = build(_cfg(), seed=0, device=torch.device("cpu"), files=embedded10)
    train, _ = split_validation(embedded10.train, 100, 0)
    known = set(_image_keys(train.images))
    x, _ = next(iter(bundle.train))
    unchanged = sum(k in known for k in _image_keys(_to_uint8(x)))
    # With pad-4 crops and flips, only an image drawn at the centre offset and unflipped is unchanged.
    assert unchanged < 16


def test_same_seed_gives_identical_batches_and_another_seed_does_not(embedded10):
    cpu = torch.device("cpu")
    a = next(iter(build(_cfg(), seed=3, device=cpu, files=embedded10).train))
    b = next(iter(build(_cfg(), seed=3, device=cpu, files=embedded10).train))
    c = next(iter(build(_cfg(), seed=4, device=cpu, files=embedded10).train))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_split_seed_not_run_seed_chooses_the_validation_images(embedded10):
    cpu = torch.device("cpu")
    v0 = _epoch(build(_cfg(), seed=0, device=cpu, files=embedded10).val)[0]
    v1 = _epoch(build(_cfg(), seed=1, device=cpu, files=embedded10).val)[0]
    v2 = _epoch(build(_cfg(split_seed=5), seed=0, device=cpu, files=embedded10).val)[0]
    assert torch.equal(v0, v1)
    assert not torch.equal(v0, v2)


def test_image_size_and_resized_crop_augment(embedded10):
    cfg = _cfg(image_size=48, augment="resized_crop_flip", batch_size=8, eval_batch_size=8)
    bundle = build(cfg, seed=0, device=torch.device("cpu"), files=embedded10)
    x, y = next(iter(bundle.train))
    assert x.shape == (8, 3, 48, 48) and y.shape == (8,)
    xt, _ = next(iter(bundle.test))
    assert xt.shape == (8, 3, 48, 48)
    assert math.isfinite(x.sum().item())
