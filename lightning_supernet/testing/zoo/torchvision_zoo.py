"""Every classification model in ``torchvision.models.list_models(module=torchvision.models)``, ``weights=None``.

Inputs are 2x3x32x32 where the model accepts them (batch 2, so BatchNorm runs in train mode even on a 1x1 final
feature map; 32x32 keeps the full zoo within about an hour on a loaded 2-core CPU); ViTs are built with
``image_size=32``; Inception-v3 needs 299x299 for its auxiliary head (train mode), MaxViT its 224x224, AlexNet 64x64 (its third max-pool needs it). The two models above
600 M parameters (ViT-H/14, RegNetY-128GF) are skipped: in float64 (the prioritization check) each needs over
5 GB per copy, more than a small shared machine has.

Example:
    >>> zoo = torchvision_zoo()
    >>> len(zoo) == len(__import__("torchvision").models.list_models(module=__import__("torchvision").models))
    True
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_supernet.testing.zoo import ZooModel, seeded

__all__ = ["torchvision_zoo"]

#: models not run, and why
SKIPPED = {
    "vit_h_14": "632 M params: over 5 GB per float64 copy, too large for a 24 GB machine shared by several jobs",
    "regnet_y_128gf": "645 M params: over 5 GB per float64 copy, too large for a 24 GB machine shared by several jobs",
}
#: the input size of most models
SIZE = 32
#: input sizes other than SIZE
SIZES = {"inception_v3": 299, "maxvit_t": 224, "alexnet": 64}
#: the fast slice (small, one per pattern: residual BN, depthwise + SE, concatenated branches, channel shuffle)
FAST = ("resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5")


def _builder(name: str) -> Any:
    import torchvision

    kwargs: dict[str, Any] = {"weights": None}
    if name.startswith("vit_"):
        kwargs["image_size"] = SIZE
    return seeded(lambda: torchvision.models.get_model(name, **kwargs).eval())


def torchvision_zoo() -> list[ZooModel]:
    """The torchvision zoo (see the module docstring).

    Example:
        >>> "resnet50" in {m.name for m in torchvision_zoo()}
        True
    """
    import torchvision

    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        size = SIZES.get(name, SIZE)
        out.append(ZooModel(name, _builder(name), seeded(lambda s=size: torch.randn(2, 3, s, s), 1),
                            fast=name in FAST, skip=SKIPPED.get(name)))
    return out
