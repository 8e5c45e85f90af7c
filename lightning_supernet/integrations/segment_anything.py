"""Segment Anything as a supernet (SuperSAM): the image encoder shrinks, the prompt encoder and mask decoder stay.

SuperSAM (Abebe et al.) turns SAM's ViT image encoder into a weight-sharing supernet by probabilistic layer
dropping (each transformer block kept with its own probability) and MLP parameter prioritisation, trained with
the sandwich rule; the subnets it finds are 30-70 % smaller than SAM ViT-B. The pieces here:

* :func:`build_sam`: a ``Sam`` from ``segment_anything.modeling`` classes (``"vit_b"``/``"vit_l"``/``"vit_h"``, or
  ``"tiny"`` for CPU tests), randomly initialised or from a checkpoint file.
* :class:`SamFineTuner`: a LightningModule for fine-tuning with box and/or point prompts, mask loss focal + dice
  (20:1 as in SAM) plus the IoU head's MSE, and mIoU with torchmetrics. ``SupernetModule`` wraps it.
* :func:`supersam_space` (the ``space=`` argument: only the image encoder's MLP widths and blocks, global-attention
  blocks protected), :func:`layer_keep_probs` and :class:`LayerDropSampler` (per-layer keep probabilities, for
  ``SandwichSampling(sampler=...)``).
* :func:`save_sam` / :func:`load_sam`: an extracted ``Sam`` (blocks dropped, each block its own MLP width) saved
  and rebuilt; ``SamPredictor`` runs on the extracted ``Sam`` directly.

``segment_anything`` is imported only when a function here needs it.

Example:
    >>> from lightning_supernet import SupernetModule
    >>> tuner = SamFineTuner(build_sam("tiny"))
    >>> supernet = SupernetModule(tuner, space=supersam_space(tuner))
    >>> sorted({d.kind for d in supernet.search_space.dims.values()})
    ['depth', 'width']
    >>> small = supernet.extract(supernet.search_space.smallest()).sam  # a standard `Sam`, smaller encoder
    >>> len(small.image_encoder.blocks)  # the two global-attention blocks of four
    2
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_supernet.errors import SearchSpaceError, SupernetError
from lightning_supernet.integrations._subnet_io import SubnetFormatError, layout_diff, load_subnet_dir, write_subnet

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from lightning_supernet.module import SupernetModule
    from lightning_supernet.space import SubnetConfig

__all__ = ["LayerDropSampler", "SAM_VARIANTS", "SamCheckpointError", "SamFineTuner", "build_sam", "dice_loss",
           "layer_keep_probs", "load_sam", "prepare_image", "sam_build_kwargs", "save_sam", "supersam_space"]

_DEFAULTS: dict[str, Any] = dict(
    img_size=1024, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True,
    use_abs_pos=True, use_rel_pos=True, window_size=14, global_attn_indexes=(2, 5, 8, 11), norm_eps=1e-6,
    prompt_embed_dim=256, mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=2048, decoder_num_heads=8,
    num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
    pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375),
)

#: presets of :func:`build_sam` (the three published SAM encoders, and a tiny one for CPU tests and examples).
SAM_VARIANTS: dict[str, dict[str, Any]] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "tiny": dict(img_size=256, embed_dim=96, depth=4, num_heads=3, global_attn_indexes=(1, 3), window_size=8,
                 prompt_embed_dim=64, decoder_mlp_dim=256, decoder_num_heads=4, iou_head_hidden_dim=64),
}


class SamCheckpointError(SupernetError, FileNotFoundError):
    """A SAM checkpoint file is missing or does not fit the model it is loaded into.

    Example:
        >>> issubclass(SamCheckpointError, FileNotFoundError)
        True
    """


def _sam_modules() -> Any:
    from lightning_supernet.integrations import require

    return require("segment_anything.modeling", "sam", "the Segment Anything integration")


def build_sam(variant: str | None = "vit_b", *, checkpoint: str | os.PathLike | None = None, **overrides: Any) -> Sam:
    """A ``segment_anything.modeling.Sam`` built from code: a preset plus overrides, random or from a checkpoint.

    Args:
        variant: a key of :data:`SAM_VARIANTS` (``"vit_b"``, ``"vit_l"``, ``"vit_h"``, ``"tiny"``) or ``None`` for
            the ViT-B defaults.
        checkpoint: a SAM ``.pth`` state dict (e.g. ``sam_vit_b_01ec64.pth``) of the same variant, or ``None``.
        **overrides: any of ``img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
            use_abs_pos, use_rel_pos, window_size, global_attn_indexes, norm_eps, prompt_embed_dim, mask_in_chans,
            decoder_depth, decoder_mlp_dim, decoder_num_heads, num_multimask_outputs, iou_head_depth,
            iou_head_hidden_dim, pixel_mean, pixel_std``.

    Raises:
        SamCheckpointError: ``checkpoint`` does not exist or does not fit the model.
        ValueError: an unknown ``variant`` or override.

    Example:
        >>> sam = build_sam("tiny", depth=2, global_attn_indexes=(1,))
        >>> len(sam.image_encoder.blocks), sam.image_encoder.img_size
        (2, 256)
    """
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise SamCheckpointError(
            f"`checkpoint` {str(checkpoint)!r} does not exist (or is not a file); allowed: the path of a SAM state "
            "dict such as sam_vit_b_01ec64.pth from the segment-anything release, for the same `variant`, or None "
            "for a randomly initialised model"
        )
    if variant is not None and variant not in SAM_VARIANTS:
        raise ValueError(f"`variant` is {variant!r}; allowed: {', '.join(SAM_VARIANTS)} or None")
    unknown = [k for k in overrides if k not in _DEFAULTS]
    if unknown:
        raise ValueError(f"`build_sam` got unknown argument {unknown[0]!r}; allowed: {', '.join(_DEFAULTS)}")
    a = {**_DEFAULTS, **(SAM_VARIANTS[variant] if variant else {}), **overrides}
    m = _sam_modules()
    from functools import partial

    emb = a["img_size"] // a["patch_size"]
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=a["depth"], embed_dim=a["embed_dim"], img_size=a["img_size"], mlp_ratio=a["mlp_ratio"],
            norm_layer=partial(nn.LayerNorm, eps=a["norm_eps"]), num_heads=a["num_heads"],
            patch_size=a["patch_size"], in_chans=a["in_chans"], qkv_bias=a["qkv_bias"], use_abs_pos=a["use_abs_pos"],
            use_rel_pos=a["use_rel_pos"], global_attn_indexes=tuple(a["global_attn_indexes"]),
            window_size=a["window_size"], out_chans=a["prompt_embed_dim"]),
        prompt_encoder=m.PromptEncoder(embed_dim=a["prompt_embed_dim"], image_embedding_size=(emb, emb),
                                       input_image_size=(a["img_size"], a["img_size"]),
                                       mask_in_chans=a["mask_in_chans"]),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=a["num_multimask_outputs"],
            transformer=m.TwoWayTransformer(depth=a["decoder_depth"], embedding_dim=a["prompt_embed_dim"],
                                            mlp_dim=a["decoder_mlp_dim"], num_heads=a["decoder_num_heads"]),
            transformer_dim=a["prompt_embed_dim"], iou_head_depth=a["iou_head_depth"],
            iou_head_hidden_dim=a["iou_head_hidden_dim"]),
        pixel_mean=list(a["pixel_mean"]), pixel_std=list(a["pixel_std"]),
    )
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        try:
            sam.load_state_dict(state)
        except RuntimeError as err:
            raise SamCheckpointError(f"`checkpoint` {str(checkpoint)!r} does not fit a SAM `{variant}` model; pass "
                                     f"the matching `variant`. {str(err).splitlines()[0]}") from err
    return sam.eval()


def sam_build_kwargs(sam: nn.Module) -> dict[str, Any]:
    """The :func:`build_sam` arguments of a model with ``sam``'s structure, read from its modules.

    For an extracted ``Sam`` (fewer blocks, per-block widths) they build a model with the same module tree; the
    per-block sizes that differ are recorded by :func:`save_sam`.

    Example:
        >>> kw = sam_build_kwargs(build_sam("tiny"))
        >>> kw["depth"], kw["global_attn_indexes"], kw["prompt_embed_dim"]
        (4, [1, 3], 64)
    """
    enc, pe, md = sam.image_encoder, sam.prompt_encoder, sam.mask_decoder
    blocks = list(enc.blocks)
    first = blocks[0]
    return dict(
        img_size=enc.img_size, patch_size=enc.patch_embed.proj.kernel_size[0],
        in_chans=enc.patch_embed.proj.in_channels, embed_dim=enc.patch_embed.proj.out_channels, depth=len(blocks),
        num_heads=first.attn.num_heads, mlp_ratio=first.mlp.lin1.out_features / enc.patch_embed.proj.out_channels,
        qkv_bias=first.attn.qkv.bias is not None, use_abs_pos=enc.pos_embed is not None,
        use_rel_pos=first.attn.use_rel_pos, window_size=max(b.window_size for b in blocks),
        global_attn_indexes=[i for i, b in enumerate(blocks) if b.window_size == 0], norm_eps=first.norm1.eps,
        prompt_embed_dim=pe.embed_dim, mask_in_chans=pe.mask_downscaling[3].out_channels,
        decoder_depth=len(md.transformer.layers), decoder_mlp_dim=md.transformer.layers[0].mlp.lin1.out_features,
        decoder_num_heads=md.transformer.layers[0].self_attn.num_heads,
        num_multimask_outputs=md.num_multimask_outputs, iou_head_depth=md.iou_prediction_head.num_layers,
        iou_head_hidden_dim=md.iou_prediction_head.layers[0].out_features,
        pixel_mean=sam.pixel_mean.flatten().tolist(), pixel_std=sam.pixel_std.flatten().tolist(),
    )


def save_sam(sam: nn.Module, path: str | os.PathLike) -> None:
    """Save a (possibly extracted, non-uniform) ``Sam`` so that :func:`load_sam` rebuilds it exactly.

    Writes ``subnet.json`` (the :func:`build_sam` arguments and every per-block shape that differs from them) and
    ``subnet.safetensors``. ``segment_anything``'s own builders take one MLP width and one head count for every
    block, so they cannot rebuild a SuperSAM subnet; this format can.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); save_sam(build_sam("tiny", depth=2, global_attn_indexes=(1,)), d)
        >>> len(load_sam(d).image_encoder.blocks)
        2
    """
    kwargs = sam_build_kwargs(sam)
    layout = layout_diff(sam, build_sam(None, **kwargs))
    write_subnet(sam, path, {"kind": "segment_anything", "kwargs": kwargs}, layout)


def load_sam(path: str | os.PathLike) -> Sam:
    """Rebuild a ``Sam`` saved by :func:`save_sam` (eval mode).

    Raises:
        SubnetFormatError: ``path`` holds no saved SAM.

    Example:
        >>> load_sam("/no/such/dir")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        SubnetFormatError: `path` '/no/such/dir' holds no subnet.json ...
    """

    def build(builder: Mapping[str, Any], where: str) -> nn.Module:
        if builder.get("kind") != "segment_anything":
            raise SubnetFormatError(f"{where} holds a {builder.get('kind')!r} subnet, not a Segment Anything one")
        return build_sam(None, **builder["kwargs"])

    return load_subnet_dir(path, build).eval()


# -- data ------------------------------------------------------------------------------------------------------
def prepare_image(image: np.ndarray, img_size: int,
                  pixel_mean: Sequence[float] = _DEFAULTS["pixel_mean"]) -> tuple[torch.Tensor, float]:
    """Resize an ``HxWx3`` uint8 image like ``SamPredictor`` (longest side to ``img_size``) and pad it square with
    the pixel mean (which normalises to 0, as SAM's pad-after-normalise does). Returns ``(3, S, S)`` float in
    [0, 255] and the resize scale (multiply pixel coordinates of boxes/points by it).

    Example:
        >>> x, scale = prepare_image(np.zeros((40, 80, 3), np.uint8), 64)
        >>> tuple(x.shape), scale
        ((3, 64, 64), 0.8)
    """
    from segment_anything.utils.transforms import ResizeLongestSide

    h, w = image.shape[:2]
    resized = ResizeLongestSide(img_size).apply_image(image)
    out = torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1).repeat(1, img_size, img_size)
    out[:, : resized.shape[0], : resized.shape[1]] = torch.from_numpy(resized).permute(2, 0, 1).float()
    return out, img_size / max(h, w)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft dice loss of mask logits ``(B, 1, H, W)`` against binary targets, averaged over masks.

    Example:
        >>> t = torch.ones(1, 1, 4, 4)
        >>> round(dice_loss(torch.full_like(t, 20.0), t).item(), 4)
        0.0
    """
    p = logits.sigmoid().flatten(1)
    t = target.flatten(1).to(p.dtype)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


# -- the fine-tuning module ------------------------------------------------------------------------------------
class SamFineTuner(pl.LightningModule):
    """Fine-tune SAM on (image, mask, prompt) batches; the image encoder is what a supernet shrinks.

    Batches are dicts: ``image`` ``(B, 3, S, S)`` float in [0, 255] at the encoder's ``img_size`` (see
    :func:`prepare_image`), ``mask`` ``(B, 1, S, S)`` in {0, 1}, and prompts in that pixel frame: ``box`` ``(B, 4)``
    xyxy and/or ``point`` ``(B, P, 2)`` xy with ``point_label`` ``(B, P)`` (1 foreground, 0 background).
    ``forward(image, box, point, point_label)`` returns SAM's low-resolution mask logits ``(B, 1, S/4, S/4)`` and
    predicted IoU ``(B, 1)``; the first is what distillation matches.

    Args:
        sam: a ``segment_anything.modeling.Sam`` (e.g. from :func:`build_sam`).
        lr: AdamW learning rate. weight_decay: AdamW weight decay.
        focal_weight, dice_weight, iou_weight: weights of the focal, dice and IoU-prediction (MSE) losses.
        freeze_prompt_encoder: keep the prompt encoder's weights fixed (as SAM fine-tuning usually does).
        freeze_mask_decoder: also keep the mask decoder fixed (train the image encoder only).

    Example:
        >>> tuner = SamFineTuner(build_sam("tiny"))
        >>> masks, iou = tuner(*tuner.example_input_array)
        >>> tuple(masks.shape), tuple(iou.shape)
        ((1, 1, 64, 64), (1, 1))
    """

    def __init__(self, sam: nn.Module, *, lr: float = 1e-4, weight_decay: float = 0.01, focal_weight: float = 20.0,
                 dice_weight: float = 1.0, iou_weight: float = 1.0, freeze_prompt_encoder: bool = True,
                 freeze_mask_decoder: bool = False) -> None:
        super().__init__()
        if not all(hasattr(sam, a) for a in ("image_encoder", "prompt_encoder", "mask_decoder")):
            raise TypeError(f"`sam` must be a segment_anything Sam (image_encoder, prompt_encoder, mask_decoder), "
                            f"got `{type(sam).__name__}`. HINT: `build_sam('vit_b', checkpoint=...)`")
        for name, value in (("lr", lr), ("focal_weight", focal_weight), ("dice_weight", dice_weight),
                            ("iou_weight", iou_weight), ("weight_decay", weight_decay)):
            if not value >= 0:
                raise ValueError(f"`{name}` must be >= 0, got {value!r}")
        self.sam = sam
        self.lr, self.weight_decay = lr, weight_decay
        self.focal_weight, self.dice_weight, self.iou_weight = focal_weight, dice_weight, iou_weight
        for part, frozen in ((sam.prompt_encoder, freeze_prompt_encoder), (sam.mask_decoder, freeze_mask_decoder)):
            part.requires_grad_(not frozen)
        from torchmetrics.segmentation import MeanIoU

        self.val_miou = MeanIoU(num_classes=1, input_format="one-hot")
        self.test_miou = MeanIoU(num_classes=1, input_format="one-hot")
        s = self.img_size
        box = torch.tensor([[s / 4, s / 4, 3 * s / 4, 3 * s / 4]])
        self.example_input_array = (torch.full((1, 3, s, s), 128.0), box)

    @property
    def img_size(self) -> int:
        """Side of the square images the encoder takes."""
        return int(self.sam.image_encoder.img_size)

    def forward(self, image: torch.Tensor, box: torch.Tensor | None = None, point: torch.Tensor | None = None,
                point_label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if box is None and point is None:
            raise ValueError("SamFineTuner needs a prompt: pass `box` (B, 4) and/or `point` (B, P, 2) with "
                             "`point_label` (B, P)")
        sam = self.sam
        x = (image - sam.pixel_mean) / sam.pixel_std
        embeddings = sam.image_encoder(x)  # (B, C, S/16, S/16)
        dense_pe = sam.prompt_encoder.get_dense_pe()
        masks, ious = [], []
        for i in range(image.shape[0]):  # the decoder takes the prompts of one image at a time
            points = None if point is None else (point[i : i + 1], point_label[i : i + 1])
            sparse, dense = sam.prompt_encoder(points=points, boxes=None if box is None else box[i : i + 1],
                                               masks=None)
            m, iou = sam.mask_decoder(image_embeddings=embeddings[i : i + 1], image_pe=dense_pe,
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
            masks.append(m)
            ious.append(iou)
        return torch.cat(masks), torch.cat(ious)

    def _predict(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        masks, iou = self(batch["image"], batch.get("box"), batch.get("point"), batch.get("point_label"))
        target = batch["mask"]
        logits = F.interpolate(masks, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return logits, iou

    def losses(self, logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "focal", "dice", "iou"}`` for full-resolution mask logits and the IoU head's predictions.

        Example:
            >>> tuner = SamFineTuner(build_sam("tiny"))
            >>> t = torch.ones(1, 1, 8, 8)
            >>> sorted(tuner.losses(torch.zeros_like(t), torch.zeros(1, 1), t))
            ['dice', 'focal', 'iou', 'loss']
        """
        from torchvision.ops import sigmoid_focal_loss

        target = target.to(logits.dtype)
        focal = sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="mean")
        dice = dice_loss(logits, target)
        with torch.no_grad():
            pred = logits > 0
            inter = (pred & (target > 0.5)).flatten(1).sum(1).float()
            union = (pred | (target > 0.5)).flatten(1).sum(1).float()
            true_iou = inter / union.clamp(min=1)
        iou = F.mse_loss(iou_pred.flatten().float(), true_iou)
        loss = self.focal_weight * focal + self.dice_weight * dice + self.iou_weight * iou
        return {"loss": loss, "focal": focal, "dice": dice, "iou": iou}

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, iou = self._predict(batch)
        parts = self.losses(logits, iou, batch["mask"])
        self.log("train_loss", parts["loss"], prog_bar=True, batch_size=logits.shape[0])
        return parts["loss"]

    def _evaluate(self, batch: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits, iou = self._predict(batch)
        parts = self.losses(logits, iou, batch["mask"])
        metric = self.val_miou if stage == "val" else self.test_miou
        metric.update((logits > 0).long(), (batch["mask"] > 0.5).long())
        n = logits.shape[0]
        self.log(f"{stage}_loss", parts["loss"], prog_bar=True, batch_size=n)
        self.log(f"{stage}_miou", metric, prog_bar=True, batch_size=n)
        return parts["loss"]

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.sam.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


# -- the SuperSAM search space and layer dropping -------------------------------------------------------------
def _encoder_prefix(model: nn.Module) -> tuple[str, nn.Module]:
    for path, mod in model.named_modules():
        if type(mod).__name__ == "ImageEncoderViT" or (hasattr(mod, "blocks") and hasattr(mod, "patch_embed")
                                                       and hasattr(mod, "neck")):
            return path, mod
    raise TypeError(f"`model` (`{type(model).__name__}`) holds no SAM ImageEncoderViT")


def supersam_space(model: nn.Module, *, heads: bool = False, protect_global_attention: bool = True,
                   **options: Any) -> dict[str, Any]:
    """The ``space=`` argument of ``SupernetModule`` for SuperSAM: only the image encoder is elastic.

    Args:
        model: the module the supernet wraps (a :class:`SamFineTuner`, a ``Sam`` or an ``ImageEncoderViT``).
        heads: also make the encoder's attention heads elastic (SuperSAM keeps them).
        protect_global_attention: never drop the global-attention blocks (``window_size == 0``), which give the
            windowed blocks their image-wide context.
        **options: more :class:`~lightning_supernet.space.SpaceOptions` fields (``min_depth``, ``width_ratios``...).

    Example:
        >>> supersam_space(SamFineTuner(build_sam("tiny")))["exclude"]
        ['sam.image_encoder.blocks.1.keep', 'sam.image_encoder.blocks.3.keep']
    """
    prefix, enc = _encoder_prefix(model)
    base = f"{prefix}." if prefix else ""
    exclude = list(options.pop("exclude", ()))
    if protect_global_attention:
        exclude += [f"{base}blocks.{i}.keep" for i, b in enumerate(enc.blocks) if getattr(b, "window_size", 1) == 0]
    include = list(options.pop("include", ())) or [f"{base}blocks.*"]
    elastic = list(options.pop("elastic", ("width", "heads", "depth") if heads else ("width", "depth")))
    return {"include": include, "exclude": exclude, "elastic": elastic, **options}


def layer_keep_probs(model: nn.Module, first: float = 1.0, last: float = 0.5) -> dict[str, float]:
    """Per-block keep probabilities of the image encoder, falling linearly from ``first`` to ``last``.

    Later blocks are dropped more often (as in stochastic depth); the result maps each block's depth dim to its
    probability, for :class:`LayerDropSampler`.

    Example:
        >>> layer_keep_probs(SamFineTuner(build_sam("tiny")))["sam.image_encoder.blocks.2.keep"]
        0.6666666666666667
    """
    for name, value in (("first", first), ("last", last)):
        if not 0 < value <= 1:
            raise ValueError(f"`{name}` must be a probability in (0, 1], got {value!r}")
    prefix, enc = _encoder_prefix(model)
    base = f"{prefix}." if prefix else ""
    n = len(enc.blocks)
    return {f"{base}blocks.{i}.keep": first + (last - first) * i / max(n - 1, 1) for i in range(n)}


class LayerDropSampler:
    """A ``SandwichSampling`` sampler with per-layer keep probabilities (SuperSAM's probabilistic layer drop).

    Widths and heads are uniform over their choices; each block's depth dim is kept with its own probability
    (``keep_probs`` maps dim names or ``fnmatch`` patterns to probabilities; others use ``default``); a stack below
    its minimum depth gets random dropped blocks back. Draws only from the generator it is given.

    Args:
        keep_probs: ``{dim name or pattern: probability}`` (e.g. from :func:`layer_keep_probs`).
        default: probability of depth dims that no entry matches.

    Example:
        >>> from lightning_supernet import SupernetModule
        >>> tuner = SamFineTuner(build_sam("tiny"))
        >>> sn = SupernetModule(tuner, space=supersam_space(tuner))
        >>> sampler = LayerDropSampler({"*.blocks.0.keep": 1.0, "*.blocks.2.keep": 1.0})
        >>> sampler(sn, torch.Generator().manual_seed(0))["sam.image_encoder.blocks.2.keep"]
        True
    """

    def __init__(self, keep_probs: Mapping[str, float], default: float = 0.5) -> None:
        for name, p in {**keep_probs, "default": default}.items():
            if not 0 <= float(p) <= 1:
                raise SearchSpaceError(f"`keep_probs[{name!r}]` must be a probability in [0, 1], got {p!r}")
        self.keep_probs = dict(keep_probs)
        self.default = default

    def prob(self, name: str) -> float:
        """The keep probability of depth dim ``name`` (exact name first, then the first matching pattern).

        Example:
            >>> LayerDropSampler({"*.blocks.0.keep": 0.9}, default=0.5).prob("sam.image_encoder.blocks.0.keep")
            0.9
        """
        if name in self.keep_probs:
            return float(self.keep_probs[name])
        for pattern, p in self.keep_probs.items():
            if fnmatch.fnmatch(name, pattern):
                return float(p)
        return self.default

    def __call__(self, supernet: SupernetModule, generator: torch.Generator, k: int = 0,
                 num_random: int = 1) -> SubnetConfig:
        space = supernet.search_space
        values = dict(space.sample(generator))
        for name, dim in space.dims.items():
            if dim.kind == "depth":
                values[name] = bool(torch.rand((), generator=generator).item() < self.prob(name))
        for stack, (length, min_kept) in space.stacks.items():
            names = space.stack_blocks(stack)
            need = max(0, min_kept - (length - len(names))) - sum(values[n] for n in names)
            dropped = [n for n in names if not values[n]]
            for i in torch.randperm(len(dropped), generator=generator)[: max(need, 0)].tolist():
                values[dropped[i]] = True
        return space.validate(values)
