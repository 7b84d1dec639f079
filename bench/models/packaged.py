"""A trained network with the suite's test-time input pipeline inside: images in, logits out.

`ImageClassifier` takes what a user has at hand, uint8 images (N x 32 x 32 x 3 as CIFAR's arrays
hold them, or N x 3 x 32 x 32) or floats in [0, 1] (N x 3 x 32 x 32), and does to them what the
suite's evaluation does to test images (bench.data.Batches without augmentation): to float / 255,
normalized with the config's mean and std, resized to the config's image size (bilinear,
antialiased), in the memory format the run evaluated in. On the CPU its logits are the ones the
suite evaluated with `eval.mode = "eval"`.

`eval.mode = "train"` (R1's measurement) evaluated with BatchNorm's batch statistics: the
classifier then normalizes every BatchNorm layer with the statistics of the batch it is given,
and touches no running statistics (it holds none). Dropout stays off, as in any loaded model:
the same images give the same logits. Given the test set in batches of `data.eval_batch_size`,
it reproduces the suite's figure up to what dropout changed in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ImageClassifier(nn.Module):
    def __init__(
        self,
        net: nn.Module,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        image_size: int,
        batch_statistics: bool,
        channels_last: bool,
    ) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.image_size, self.channels_last = image_size, channels_last
        if batch_statistics:
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    # Without running statistics BatchNorm normalizes with the batch's, in eval
                    # mode too, and has nothing to update.
                    m.track_running_stats = False
                    m.running_mean = m.running_var = m.num_batches_tracked = None
        if channels_last:
            net.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        x = images
        if x.shape[-1] == 3 and x.shape[1] != 3:  # N x H x W x C, as CIFAR's arrays
            x = x.permute(0, 3, 1, 2)
        if x.dtype == torch.uint8:
            x = x.float().div(255)
        x = x.sub(self.mean).div(self.std)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)
