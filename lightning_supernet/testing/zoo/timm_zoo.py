"""timm models (``pretrained=False``) of the families issue 9 names, at small input sizes.

ViT/DeiT/CaiT/Mixer/LeViT take ``img_size=64``; Swin is built for 64x64 with 4x4 windows; the CNNs run on
2x3x64x64 (batch 2 so that BatchNorm runs in train mode). Several are 12-layer (ViT-Tiny, DeiT-Tiny, ViT-Small)
or deeper (CaiT-XXS24: 24 layers).

Example:
    >>> "vit_tiny_patch16_224" in {m.name for m in timm_zoo()}
    True
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_supernet.testing.zoo import ZooModel, seeded

__all__ = ["timm_zoo"]

# name -> (create_model kwargs, input size)
MODELS: dict[str, tuple[dict[str, Any], int]] = {
    "vit_tiny_patch16_224": ({"img_size": 64}, 64),
    "vit_small_patch16_224": ({"img_size": 64}, 64),
    "deit_tiny_patch16_224": ({"img_size": 64}, 64),
    "deit_tiny_distilled_patch16_224": ({"img_size": 64}, 64),
    "resnet18": ({}, 64),
    "resnet50": ({}, 64),
    "efficientnet_b0": ({}, 64),
    "mobilenetv3_small_100": ({}, 64),
    "mobilenetv3_large_100": ({}, 64),
    "convnext_atto": ({}, 64),
    "regnetx_002": ({}, 64),
    "regnety_002": ({}, 64),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 4}, 64),
    "levit_128s": ({"img_size": 64}, 64),
    "mixer_s16_224": ({"img_size": 64}, 64),
    "cait_xxs24_224": ({"img_size": 64}, 64),
    "efficientvit_b0": ({}, 64),
    "efficientvit_m0": ({"img_size": 64}, 64),
    "fastvit_t8": ({}, 64),
}
FAST = ("vit_tiny_patch16_224", "mobilenetv3_small_100", "convnext_atto")


def timm_zoo() -> list[ZooModel]:
    """The timm zoo (see the module docstring).

    Example:
        >>> len(timm_zoo()) >= 13
        True
    """
    import timm

    out = []
    for name, (kwargs, size) in MODELS.items():
        build = seeded(lambda n=name, k=kwargs: timm.create_model(n, pretrained=False, **k).eval())
        out.append(ZooModel(name, build, seeded(lambda s=size: torch.randn(2, 3, s, s), 1), fast=name in FAST))
    return out
