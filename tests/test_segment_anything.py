"""SuperSAM: SAM's image encoder as the supernet, fine-tuning, extraction into a standard ``Sam``, errors.

A micro SAM (64x64 images, 4 blocks of width 32) keeps every test fast on CPU; numbers are compared exactly
where the computation is the same (supernet under a config vs. the extracted model vs. a reload).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("segment_anything")

from segment_anything import SamPredictor  # noqa: E402

from lightning_supernet import SupernetModule  # noqa: E402
from lightning_supernet.integrations._subnet_io import SubnetFormatError  # noqa: E402
from lightning_supernet.integrations.segment_anything import (  # noqa: E402
    LayerDropSampler,
    SamCheckpointError,
    SamFineTuner,
    build_sam,
    dice_loss,
    layer_keep_probs,
    load_sam,
    prepare_image,
    save_sam,
    supersam_space,
)

MICRO = dict(img_size=64, embed_dim=32, depth=4, num_heads=2, global_attn_indexes=(1, 3), window_size=2,
             prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32)


def _micro_sam(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    sam = build_sam("tiny", **MICRO)
    with torch.no_grad():  # SAM zero-initialises relative positions; make them matter
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.1)
    return sam


def _batch(n: int = 4, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images with a darker rectangle, its mask, its box and one foreground point."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, size, size, generator=g) * 255
    mask = torch.zeros(n, 1, size, size)
    box = torch.zeros(n, 4)
    for i in range(n):
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
        mask[i, 0, y0 : y0 + h, x0 : x0 + w] = 1
        image[i, :, y0 : y0 + h, x0 : x0 + w] *= 0.3
        box[i] = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float)
    point = (box[:, :2] + box[:, 2:]).div(2).unsqueeze(1)
    return {"image": image, "mask": mask, "box": box, "point": point, "point_label": torch.ones(n, 1)}


@pytest.fixture(scope="module")
def supernet() -> SupernetModule:
    tuner = SamFineTuner(_micro_sam())
    return SupernetModule(tuner, space=supersam_space(tuner))


def _config(sn: SupernetModule):
    """Block 0 dropped, block 2 at a quarter of its MLP width, block 1 at three quarters."""
    return sn.search_space.config({"sam.image_encoder.blocks.0.keep": False,
                                   "sam.image_encoder.blocks.2.mlp.lin1.width": 32,
                                   "sam.image_encoder.blocks.1.mlp.lin1.width": 96})


# -- the search space ---------------------------------------------------------------------------------------------
def test_only_the_image_encoder_is_elastic_and_global_blocks_are_protected(supernet) -> None:
    dims = supernet.search_space.dims
    assert all(name.startswith("sam.image_encoder.blocks.") for name in dims)
    assert {d.kind for d in dims.values()} == {"width", "depth"}  # SuperSAM: layer drop + MLP widths
    assert sorted(n for n, d in dims.items() if d.kind == "depth") == [
        "sam.image_encoder.blocks.0.keep", "sam.image_encoder.blocks.2.keep"]  # blocks 1 and 3 attend globally
    assert dims["sam.image_encoder.blocks.0.mlp.lin1.width"].choices == (128, 96, 64, 32)
    with_heads = SupernetModule(SamFineTuner(_micro_sam()), space=supersam_space(supernet.model, heads=True))
    assert "sam.image_encoder.blocks.0.attn.heads" in with_heads.search_space.dims


def test_layer_drop_sampler_uses_per_layer_probabilities(supernet) -> None:
    probs = layer_keep_probs(supernet.model, first=0.9, last=0.2)
    assert probs["sam.image_encoder.blocks.0.keep"] == pytest.approx(0.9)
    assert probs["sam.image_encoder.blocks.2.keep"] == pytest.approx(0.9 - 0.7 * 2 / 3)
    sampler = LayerDropSampler(probs)
    gen = torch.Generator().manual_seed(0)
    draws = [sampler(supernet, gen) for _ in range(400)]
    rate0 = np.mean([c["sam.image_encoder.blocks.0.keep"] for c in draws])
    rate2 = np.mean([c["sam.image_encoder.blocks.2.keep"] for c in draws])
    assert abs(rate0 - 0.9) < 0.06 and abs(rate2 - (0.9 - 0.7 * 2 / 3)) < 0.08
    assert len({c["sam.image_encoder.blocks.1.mlp.lin1.width"] for c in draws}) == 4  # widths uniform
    again = LayerDropSampler(probs)
    assert [again(supernet, torch.Generator().manual_seed(5)) for _ in range(3)] == \
        [sampler(supernet, torch.Generator().manual_seed(5)) for _ in range(3)]  # only its generator is used
    with pytest.raises(ValueError, match=r"`keep_probs\['x'\]` must be a probability in \[0, 1\], got 1.5"):
        LayerDropSampler({"x": 1.5})


# -- extraction into a standard Sam, SamPredictor, save/load ------------------------------------------------------
def test_extracted_encoder_in_a_standard_sam_gives_the_supernets_masks(supernet) -> None:
    from segment_anything.modeling import ImageEncoderViT, Sam

    cfg = _config(supernet)
    batch = _batch()
    supernet.eval()
    with supernet.subnet(cfg), torch.no_grad():
        expected_masks, expected_iou = supernet(batch["image"], batch["box"])
    with torch.no_grad():
        full_masks, _ = supernet(batch["image"], batch["box"])
    assert not torch.allclose(full_masks, expected_masks)
    small = supernet.extract(cfg).eval()
    sam = small.sam
    assert type(sam) is Sam and type(sam.image_encoder) is ImageEncoderViT
    blocks = sam.image_encoder.blocks
    assert len(blocks) == 3 and [b.mlp.lin1.out_features for b in blocks] == [96, 32, 128]
    assert [b.window_size for b in blocks] == [0, 2, 0]
    # the prompt encoder and mask decoder are the supernet's, unchanged
    for name, p in sam.mask_decoder.state_dict().items():
        assert torch.equal(p, supernet.model.sam.mask_decoder.state_dict()[name])
    with torch.no_grad():
        masks, iou = small(batch["image"], batch["box"])
    torch.testing.assert_close(masks, expected_masks)
    torch.testing.assert_close(iou, expected_iou)
    # a fresh standard Sam assembled from the extracted encoder and the original prompt encoder / decoder
    rebuilt = Sam(sam.image_encoder, supernet.model.sam.prompt_encoder, supernet.model.sam.mask_decoder)
    with torch.no_grad():
        torch.testing.assert_close(SamFineTuner(rebuilt)(batch["image"], batch["box"])[0], expected_masks)

    # SamPredictor on a non-square uint8 image: same logits as the supernet's Sam under the config
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    box = np.array([8, 6, 40, 30])
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    mask, score, low = predictor.predict(box=box, multimask_output=False, return_logits=True)
    assert mask.shape == (1, 48, 64)
    with supernet.subnet(cfg):
        reference = SamPredictor(supernet.model.sam)
        reference.set_image(image)
        mask_ref, score_ref, low_ref = reference.predict(box=box, multimask_output=False, return_logits=True)
    np.testing.assert_allclose(low, low_ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(score, score_ref, atol=1e-5, rtol=0)
    # ... and the fine-tuner sees what the predictor sees (prepare_image pads with the pixel mean)
    x, scale = prepare_image(image, 64)
    with torch.no_grad():
        tuned, _ = small(x[None], torch.tensor(box, dtype=torch.float)[None] * scale)
    np.testing.assert_allclose(tuned[0].numpy(), low, atol=1e-4, rtol=0)


def test_save_and_load_a_non_uniform_sam(supernet, tmp_path) -> None:
    cfg = _config(supernet)
    small = supernet.extract(cfg).eval()
    save_sam(small.sam, tmp_path)
    layout = json.loads((tmp_path / "subnet.json").read_text())
    assert layout["builder"]["kwargs"]["depth"] == 3
    assert layout["builder"]["kwargs"]["global_attn_indexes"] == [0, 2]
    assert "image_encoder.blocks.1.mlp.lin1.weight" in layout["shapes"]
    loaded = load_sam(tmp_path)
    batch = _batch(2)
    with torch.no_grad():
        expected, _ = small(batch["image"], batch["box"], batch["point"], batch["point_label"])
        got, _ = SamFineTuner(loaded)(batch["image"], batch["box"], batch["point"], batch["point_label"])
    torch.testing.assert_close(got, expected)
    with pytest.raises(SubnetFormatError, match="holds no subnet.json"):
        load_sam(tmp_path / "missing")


# -- builder errors -----------------------------------------------------------------------------------------------
def test_build_sam_checkpoints_and_errors(tmp_path) -> None:
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(SamCheckpointError, match=r"`checkpoint` '.*sam_vit_b_01ec64.pth' does not exist") as err:
        build_sam("vit_b", checkpoint=missing)
    assert isinstance(err.value, FileNotFoundError)
    sam = _micro_sam(1)
    torch.save(sam.state_dict(), tmp_path / "micro.pth")
    loaded = build_sam("tiny", checkpoint=tmp_path / "micro.pth", **MICRO)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sam.state_dict().items())
    with pytest.raises(SamCheckpointError, match="does not fit a SAM `tiny` model"):
        build_sam("tiny", checkpoint=tmp_path / "micro.pth", **{**MICRO, "embed_dim": 64})
    with pytest.raises(ValueError, match="`variant` is 'vit_x'; allowed: vit_b, vit_l, vit_h, tiny"):
        build_sam("vit_x")
    with pytest.raises(ValueError, match="unknown argument 'depths'"):
        build_sam("tiny", depths=3)
    with pytest.raises(TypeError, match="`sam` must be a segment_anything Sam"):
        SamFineTuner(torch.nn.Linear(2, 2))


# -- losses, mIoU and training ------------------------------------------------------------------------------------
def test_losses_and_miou() -> None:
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, :4] = 1
    assert dice_loss(target * 40 - 20, target).item() == pytest.approx(0.0, abs=1e-6)
    # disjoint: 1 - eps / (32 predicted + 32 target pixels + eps), per mask
    assert dice_loss(-target * 40 + 20, target).item() == pytest.approx(1 - 1 / 65, abs=1e-5)
    tuner = SamFineTuner(_micro_sam())
    parts = tuner.losses(target * 40 - 20, torch.ones(2, 1), target)
    assert parts["iou"].item() == pytest.approx(0.0) and parts["focal"].item() < 1e-6
    # validation mIoU through torchmetrics equals the mean per-mask IoU computed by hand
    import lightning as L

    batch = _batch(4)
    with torch.no_grad():
        logits, _ = tuner._predict(batch)
    pred, gt = logits > 0, batch["mask"] > 0.5
    manual = ((pred & gt).flatten(1).sum(1) / (pred | gt).flatten(1).sum(1)).mean().item()
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in batch.items()} for i in range(4)], batch_size=2)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(tuner, loader, verbose=False)[0]
    assert metrics["val_miou"] == pytest.approx(manual, abs=1e-6)


def test_supersam_trains_with_sandwich_layer_drop_and_prioritization() -> None:
    import lightning as L

    from lightning_supernet.callbacks import InplaceDistillation, ParameterPrioritization, SandwichSampling

    tuner = SamFineTuner(_micro_sam(), lr=1e-3)
    supernet = SupernetModule(tuner, space=supersam_space(tuner), eval_subnets=("largest", "smallest"))
    batch = _batch(8)
    data = [{k: v[i] for k, v in batch.items() if k in ("image", "mask", "box")} for i in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    sampler = LayerDropSampler(layer_keep_probs(tuner))
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ParameterPrioritization(), SandwichSampling(num_random=2, sampler=sampler),
                                   InplaceDistillation(loss="bce")])
    trainer.fit(supernet, loader, loader)
    after = supernet.state_dict()
    assert not torch.equal(after["sam.image_encoder.blocks.0.mlp.lin1.weight"],
                           before["sam.image_encoder.blocks.0.mlp.lin1.weight"])
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("sam.prompt_encoder."))
    assert {"val_miou", "val/miou/smallest"} <= set(trainer.callback_metrics)
    small = supernet.extract(supernet.search_space.smallest()).eval()
    assert len(small.sam.image_encoder.blocks) == 2
