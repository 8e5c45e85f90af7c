"""A small ViT in the timm style: fused ``qkv`` with ``self.num_heads``, ``fc1/act/fc2`` MLPs, pre-norm blocks.

Example:
    >>> import torch
    >>> m = TinyViT(img_size=8, patch_size=2, in_chans=1, dim=32, depth=2, num_heads=4)
    >>> m(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "Block", "Mlp", "TinyViT"]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection laid out ``[3][heads][head_dim]``.

    Example:
        >>> Attention(16, 4)(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nh, N, hd)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2``.

    Example:
        >>> Mlp(16, 64)(torch.randn(2, 16)).shape
        torch.Size([2, 16])
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with residual connections.

    Example:
        >>> Block(16, 4, 2.0)(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A ViT classifier: conv patch embedding, class token, learned positions, ``depth`` blocks, linear head.

    Args:
        img_size: input height/width. patch_size: patch side. in_chans: input channels.
        dim: embedding width. depth: blocks. num_heads: heads per block. mlp_ratio: MLP hidden / dim.
        num_classes: output classes.

    Example:
        >>> TinyViT(img_size=8, patch_size=4, dim=16, depth=1, num_heads=2).pos_embed.shape
        torch.Size([1, 5, 16])
    """

    def __init__(self, img_size: int = 8, patch_size: int = 2, in_chans: int = 1, dim: int = 64, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.patch_embed = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))
