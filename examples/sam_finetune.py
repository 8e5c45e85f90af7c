"""SuperSAM: fine-tune Segment Anything with its image encoder as a supernet, then extract a smaller SAM.

Data: scikit-learn's two sample photos (``load_sample_images``), cut into random square crops, each with a
synthetic object (a textured ellipse) pasted in; its mask is known exactly and the prompt is a jittered box (or,
with ``--points``, one point inside the object). Model: ``SamFineTuner`` around a SAM built from
``segment_anything.modeling`` classes (a tiny encoder on CPU; ``--vit-b`` for the real ViT-B, optionally from
``--checkpoint``). The supernet is the image encoder only: blocks dropped with per-layer keep probabilities
(global-attention blocks kept) and MLP widths, trained with the sandwich rule, in-place distillation of the mask
logits and MLP parameter prioritisation. Then two subnets are extracted into standard ``Sam`` models, evaluated
(mIoU), saved and reloaded, and run through ``SamPredictor`` on a photo.

Run::

    python examples/sam_finetune.py                       # tiny encoder at 96x96, CPU, a few minutes
    python examples/sam_finetune.py --vit-b --device cuda --checkpoint sam_vit_b_01ec64.pth --epochs 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_sample_images

from lightning_supernet import SupernetModule
from lightning_supernet.callbacks import InplaceDistillation, ParameterPrioritization, SandwichSampling
from lightning_supernet.cost import count_params
from lightning_supernet.integrations.segment_anything import (
    LayerDropSampler,
    SamFineTuner,
    build_sam,
    layer_keep_probs,
    load_sam,
    prepare_image,
    save_sam,
    supersam_space,
)


def make_samples(n: int, img_size: int, seed: int = 0, points: bool = False) -> list[dict[str, torch.Tensor]]:
    """``n`` crops of the sample photos with a pasted textured ellipse, its mask and a box/point prompt."""
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:img_size, 0:img_size]
    samples = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(160, min(photo.shape[:2]) + 1))
        y0, x0 = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        image, _ = prepare_image(photo[y0 : y0 + side, x0 : x0 + side], img_size)  # square crop: no padding
        cy, cx = rng.uniform(0.25, 0.75, 2) * img_size
        ay, ax = rng.uniform(0.08, 0.25, 2) * img_size
        angle = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask = torch.from_numpy((u / ax) ** 2 + (v / ay) ** 2 <= 1)
        colour = image.mean((1, 2)) + torch.from_numpy(rng.uniform(-90, 90, 3)).float()
        texture = torch.from_numpy(rng.normal(0, 18, (1, img_size, img_size))).float()
        image = torch.where(mask, (colour.view(3, 1, 1) + texture).clamp(0, 255), image)
        ys, xs = torch.nonzero(mask, as_tuple=True)
        jitter = torch.from_numpy(rng.normal(0, 0.02 * img_size, 4)).float()
        box = torch.tensor([xs.min(), ys.min(), xs.max(), ys.max()], dtype=torch.float) + jitter
        sample = {"image": image, "mask": mask[None].float(), "box": box.clamp(0, img_size - 1)}
        if points:
            k = int(rng.integers(len(xs)))
            sample.update(point=torch.tensor([[xs[k], ys[k]]], dtype=torch.float), point_label=torch.ones(1))
            del sample["box"]
        samples.append(sample)
    return samples


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vit-b", action="store_true", help="the real SAM ViT-B encoder (1024x1024; use a GPU)")
    p.add_argument("--checkpoint", default=None, help="a SAM ViT-B state dict, e.g. sam_vit_b_01ec64.pth")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--img-size", type=int, default=96, help="image side of the tiny encoder (CPU mode)")
    p.add_argument("--samples", type=int, default=120)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-random", type=int, default=1, help="random subnets per step besides largest/smallest")
    p.add_argument("--points", action="store_true", help="prompt with one point instead of a box")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--focal-weight", type=float, default=None,
                   help="focal:dice weight; default 20 (SAM's) with --checkpoint, 1 from scratch (a random SAM "
                        "first learns to predict nothing under a 20x focal loss)")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    L.seed_everything(args.seed)
    if args.vit_b:
        sam = build_sam("vit_b", checkpoint=args.checkpoint)
    else:
        sam = build_sam("tiny", checkpoint=args.checkpoint, img_size=args.img_size,
                        window_size=max(2, args.img_size // 32))
    focal = args.focal_weight if args.focal_weight is not None else (20.0 if args.checkpoint else 1.0)
    # from scratch the (random) prompt encoder must learn too; a pretrained one stays fixed, as in SAM fine-tuning
    tuner = SamFineTuner(sam, lr=args.lr, focal_weight=focal, freeze_prompt_encoder=bool(args.checkpoint))
    size = tuner.img_size
    data = make_samples(args.samples, size, args.seed, args.points)
    n_val = max(len(data) // 6, 2)
    train = torch.utils.data.DataLoader(data[n_val:], batch_size=args.batch_size, shuffle=True)
    val = torch.utils.data.DataLoader(data[:n_val], batch_size=args.batch_size)

    supernet = SupernetModule(tuner, space=supersam_space(tuner), eval_subnets=("largest", "smallest"))
    print(supernet.search_space)
    sampler = LayerDropSampler(layer_keep_probs(tuner, first=1.0, last=0.5))
    gpu = args.device.startswith("cuda")
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="gpu" if gpu else "cpu", devices=1, logger=False,
                        precision="bf16-mixed" if gpu else "32-true", enable_checkpointing=False,
                        enable_model_summary=False, log_every_n_steps=5,
                        callbacks=[ParameterPrioritization(),
                                   SandwichSampling(num_random=args.num_random, sampler=sampler),
                                   InplaceDistillation(loss="bce")])
    t0 = time.time()
    trainer.fit(supernet, train, val)
    print(f"supernet trained in {time.time() - t0:.0f} s")

    space = supernet.search_space
    half = {n: sorted(d.choices)[len(d.choices) // 2 - 1] for n, d in space.dims.items() if d.kind == "width"}
    subnets = {"largest": space.largest(), "half MLP, layers dropped": space.config(
        {**half, **{n: False for n in space.stack_blocks(next(iter(space.stacks)))[1::2]}}),
        "smallest": space.smallest()}
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="supersam_"))
    results = {}
    photo = load_sample_images().images[1]
    print(f"\n{'subnet':<26} {'encoder params':>14} {'blocks':>6} {'val mIoU':>9} {'reloaded':>9}  predictor mask")
    for i, (name, cfg) in enumerate(subnets.items()):
        small = supernet.extract(cfg)
        miou = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False).validate(small, val, verbose=False)[0]["val_miou"]
        save_sam(small.sam, out / f"subnet{i}")
        reloaded = load_sam(out / f"subnet{i}")
        re_miou = L.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False).validate(SamFineTuner(reloaded), val,
                                                                 verbose=False)[0]["val_miou"]
        from segment_anything import SamPredictor

        predictor = SamPredictor(reloaded.to(args.device))
        predictor.set_image(photo)
        masks, scores, _ = predictor.predict(box=np.array([200, 100, 450, 350]), multimask_output=False)
        enc = small.sam.image_encoder
        results[name] = {"encoder_params": count_params(enc), "val_miou": miou, "reloaded_miou": re_miou}
        print(f"{name:<26} {count_params(enc):>14,} {len(enc.blocks):>6} {miou:>9.3f} {re_miou:>9.3f}  "
              f"{masks.shape[1]}x{masks.shape[2]}, {masks.mean():.1%} of the photo, score {scores[0]:.2f}")
    print(f"saved SAM subnets under {out}")
    return results


if __name__ == "__main__":
    main()
