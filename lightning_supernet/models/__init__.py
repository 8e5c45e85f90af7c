"""Small reference models used by the demo, the examples and the tests (all built from code, no downloads).

Example:
    >>> from lightning_supernet.models import TinyViT
    >>> TinyViT(img_size=8, patch_size=2, dim=32, depth=2, num_heads=4).num_classes
    10
"""

from lightning_supernet.models.cnn import ResNetLike
from lightning_supernet.models.vit import TinyViT

__all__ = ["ResNetLike", "TinyViT"]
