"""PyTorch's own attention: ``nn.TransformerEncoder``/``Decoder``/``nn.Transformer``/``nn.MultiheadAttention``.

Each is wrapped in a small model (input projection, the transformer, an output head), batch-first and not, with
a key padding mask (the nested-tensor fast path in eval without autograd), ``kdim``/``vdim`` cross attention
(separate q/k/v weights), pre-norm, 12 layers, and Lightning's own demo transformer.

Example:
    >>> m = next(m for m in torch_zoo() if m.name == "encoder_batch_first")
    >>> m.build()(m.example()).shape
    torch.Size([2, 10, 5])
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_supernet.testing.zoo import ZooModel, seeded

__all__ = ["torch_zoo"]

D, HEADS, FF, IN, OUT, SEQ = 32, 4, 64, 12, 5, 10


class EncoderModel(nn.Module):
    """Linear in -> ``nn.TransformerEncoder`` -> Linear out; ``forward(x, padding_mask=None)``.

    Example:
        >>> EncoderModel(layers=1)(torch.randn(2, 10, 12)).shape
        torch.Size([2, 10, 5])
    """

    def __init__(self, layers: int = 2, batch_first: bool = True, norm_first: bool = False,
                 final_norm: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.proj = nn.Linear(IN, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(D) if final_norm else None,
                                             enable_nested_tensor=batch_first and not norm_first)
        self.head = nn.Linear(D, OUT)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h, src_key_padding_mask=padding_mask)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h)


class DecoderModel(nn.Module):
    """``nn.TransformerDecoder`` attending to a memory projected from a second input.

    Example:
        >>> DecoderModel()(torch.randn(2, 10, 12), torch.randn(2, 7, 12)).shape
        torch.Size([2, 10, 5])
    """

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.proj, self.mem = nn.Linear(IN, D), nn.Linear(IN, D)
        layer = nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.head = nn.Linear(D, OUT)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.decoder(self.proj(x), self.mem(memory), tgt_mask=mask))


class Seq2Seq(nn.Module):
    """``nn.Transformer`` (encoder and decoder) between two projections.

    Example:
        >>> Seq2Seq()(torch.randn(2, 10, 12), torch.randn(2, 6, 12)).shape
        torch.Size([2, 6, 5])
    """

    def __init__(self, layers: int = 2, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.src, self.tgt = nn.Linear(IN, D), nn.Linear(IN, D)
        self.transformer = nn.Transformer(D, HEADS, layers, layers, FF, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(D, OUT)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        s, t = self.src(src), self.tgt(tgt)
        if not self.batch_first:
            s, t = s.transpose(0, 1), t.transpose(0, 1)
        h = self.transformer(s, t, tgt_mask=nn.Transformer.generate_square_subsequent_mask(t.shape[0 if not
                                                                                            self.batch_first else 1]))
        return self.head(h if self.batch_first else h.transpose(0, 1))


class MHABlock(nn.Module):
    """Pre-norm block: ``x + MHA(LN(x))`` (self or ``kdim``/``vdim`` cross attention), then ``x + MLP(LN(x))``.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 5, 32)
        >>> MHABlock(batch_first=True, cross=False)(x, x).shape  # self-attention ignores the context
        torch.Size([2, 5, 32])
    """

    def __init__(self, batch_first: bool, cross: bool) -> None:
        super().__init__()
        self.batch_first, self.cross = batch_first, cross
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        kv = 20 if cross else None
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=batch_first, kdim=kv, vdim=kv)
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        kv = context if self.cross else h
        x = x + self.attn(h, kv, kv, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class MHAModel(nn.Module):
    """A stack of :class:`MHABlock` over projected inputs; ``forward(x, context)`` (context: ``kdim``=20 features).

    Example:
        >>> MHAModel(cross=True)(torch.randn(2, 10, 12), torch.randn(2, 7, 20)).shape
        torch.Size([2, 10, 5])
    """

    def __init__(self, layers: int = 2, batch_first: bool = True, cross: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.proj = nn.Linear(IN, D)
        self.blocks = nn.ModuleList(MHABlock(batch_first, cross) for _ in range(layers))
        self.head = nn.Linear(D, OUT)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        if not self.batch_first:
            h, context = h.transpose(0, 1), context.transpose(0, 1)
        for block in self.blocks:
            h = block(h, context)
        return self.head(h if self.batch_first else h.transpose(0, 1))


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(2, SEQ, dtype=torch.bool)
    mask[1, 7:] = True
    return torch.randn(2, SEQ, IN), mask


def _lightning_demo() -> nn.Module:
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=50, ninp=32, nhead=4, nhid=64, nlayers=2, dropout=0.0).eval()


def torch_zoo() -> list[ZooModel]:
    """The PyTorch-attention zoo (see the module docstring).

    Example:
        >>> any(m.name == "encoder_12_layers" for m in torch_zoo())
        True
    """
    x = seeded(lambda: _x(2, SEQ, IN), 1)
    ctx = seeded(lambda: (_x(2, SEQ, IN), _x(2, 7, 20)), 1)
    pair = seeded(lambda: (_x(2, SEQ, IN), _x(2, 7, IN)), 1)
    entries = [
        ("encoder_batch_first", lambda: EncoderModel(), x, True),
        ("encoder_seq_first", lambda: EncoderModel(batch_first=False), x, True),
        ("encoder_padding_mask", lambda: EncoderModel(), seeded(_padded, 1), True),
        ("encoder_norm_first_final_norm", lambda: EncoderModel(norm_first=True, final_norm=True), x, False),
        ("encoder_12_layers", lambda: EncoderModel(layers=12), x, False),
        ("decoder", lambda: DecoderModel(), pair, False),
        ("transformer_batch_first", lambda: Seq2Seq(), pair, True),
        ("transformer_seq_first", lambda: Seq2Seq(batch_first=False), pair, False),
        ("mha_self_batch_first", lambda: MHAModel(), ctx, True),
        ("mha_self_seq_first", lambda: MHAModel(batch_first=False), ctx, False),
        ("mha_kdim_vdim", lambda: MHAModel(cross=True), ctx, True),
        ("mha_12_layers", lambda: MHAModel(layers=12), ctx, False),
        ("lightning_demo_transformer", _lightning_demo,
         seeded(lambda: (torch.randint(0, 50, (2, SEQ)), torch.randint(0, 50, (2, SEQ))), 1), False),
    ]
    return [ZooModel(name, seeded(lambda b=build: b().eval()), example, fast=fast)
            for name, build, example, fast in entries]
