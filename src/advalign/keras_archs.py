"""Architectures of released Keras models that timm does not have, registered with timm.

``keras_resnet50v2``: Keras's ``ResNet50V2`` (keras.applications). It is a pre-activation
ResNet-50 like timm's ``resnetv2_50`` but not the same network: Keras puts each stage's
stride 2 in the stage's *last* block (its shortcut a 1x1 max-pool with stride 2, i.e. a
subsampling), timm in the first; the stem convolution has a bias and no normalisation
before the max-pool, which pads with zeros; every BatchNorm has eps 1.001e-5.
Registered with timm, so the zoo builds it by ``timm_name`` like any other architecture.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model

IMAGENET_CFG = {
    "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
    "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
    "first_conv": "conv1", "classifier": "fc",
}  # fmt: skip
KERAS_RESNET_BN_EPS = 1.001e-5


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=KERAS_RESNET_BN_EPS)


class KerasPreActBottleneck(nn.Module):
    """Keras's ``block2``: BN-ReLU first, then 1x1, 3x3 (stride here), 1x1 with bias."""

    def __init__(self, in_chs: int, width: int, stride: int, conv_shortcut: bool):
        super().__init__()
        out_chs = 4 * width
        self.preact_bn = _bn(in_chs)
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride) if conv_shortcut else None
        self.stride = stride
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(width)
        self.conv3 = nn.Conv2d(width, out_chs, 1)

    def forward(self, x):
        preact = F.relu(self.preact_bn(x))
        if self.shortcut is not None:
            shortcut = self.shortcut(preact)
        else:
            shortcut = x[:, :, :: self.stride, :: self.stride]  # Keras: MaxPooling2D(1, strides=stride)
        x = F.relu(self.bn1(self.conv1(preact)))
        x = F.relu(self.bn2(self.conv2(x)))
        return shortcut + self.conv3(x)


class KerasResNetV2(nn.Module):
    """Keras's ResNet-V2 family: stem, four stages of :class:`KerasPreActBottleneck`, post-BN, head."""

    def __init__(self, depths=(3, 4, 6, 3), num_classes: int = 1000, in_chans: int = 3, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2)  # after a zero padding of 3
        stages, in_chs = [], 64
        for i, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512))):
            last_stride = 1 if i == len(depths) - 1 else 2
            blocks = []
            for b in range(depth):
                stride = last_stride if b == depth - 1 else 1
                blocks.append(KerasPreActBottleneck(in_chs, width, stride, conv_shortcut=b == 0))
                in_chs = 4 * width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.post_bn = _bn(in_chs)
        self.num_features = in_chs
        self.fc = nn.Linear(in_chs, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x):
        x = self.conv1(F.pad(x, (3, 3, 3, 3)))
        x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, stride=2)  # Keras pads with zeros, not -inf
        return F.relu(self.post_bn(self.stages(x)))

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None):
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


@register_model
def keras_resnet50v2(pretrained: bool = False, **kwargs) -> KerasResNetV2:
    """Keras's ResNet50V2 (stride in each stage's last block); weights come from a Keras file."""
    if pretrained:
        raise ValueError("keras_resnet50v2 has no timm weights: import a Keras file (zoo checkpoint_keys: keras)")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    model = KerasResNetV2(depths=(3, 4, 6, 3), **kwargs)
    model.pretrained_cfg = model.default_cfg = dict(IMAGENET_CFG, architecture="keras_resnet50v2")
    return model

