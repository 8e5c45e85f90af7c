"""Shared test set-up: the ``slow``/``gpu`` markers, seeding, and small models of the five model families.

Every model is built from code with a fixed seed (no downloads). A :class:`Family` bundles a fresh model, its
example input, how to pick the output tensor, and what discovery must find in it, so one test body covers:

* ``tiny_vit``: :class:`lightning_supernet.models.TinyViT` (fused qkv, ``self.num_heads``),
* ``resnet_like``: :class:`lightning_supernet.models.ResNetLike` (BatchNorm, bottleneck residuals),
* ``bert``: Hugging Face ``BertForSequenceClassification`` (split query/key/value),
* ``llama``: Hugging Face ``LlamaForCausalLM`` (grouped-query attention, gated MLP),
* ``sam``: Segment Anything's ``ImageEncoderViT`` (windowed attention, relative positions).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_supernet.ir.graph import call_model
from lightning_supernet.models import TinyViT

FAMILY_NAMES = ("tiny_vit", "resnet_like", "bert", "llama", "sam")


# -- options and markers ----------------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked `slow`")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running; run with --runslow")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (the library itself never reads the global RNG)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# The DDP tests fork worker processes. GNU OpenMP is not fork-safe: once this process has run a parallel region,
# a forked child hangs in its first one (seen as a DDP test stuck in Conv2d's forward). One intra-op thread in
# the test process creates no OpenMP team, so forking stays safe; the suite runs one test at a time anyway.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    """A process group left in the pytest process would be inherited by the next forked DDP test and hang it."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed() -> None:
    seed_everything(0)


# -- the five families ------------------------------------------------------------------------------------------
@dataclass
class Family:
    """A small model of one family plus what the tests expect discovery to find in it.

    Attributes:
        name: the family's id. model: a fresh model in eval mode. example: its example input (a tensor or a dict
            of keyword arguments). output: picks the output tensor from the model's return value.
        keep_dims: the exact set of depth dims (``<block>.keep``).
        width_dims: MLP-hidden (or CNN bottleneck) width dims -> (full size, member modules the group couples).
        head_dims: attention head dims -> full head count (empty for the CNN).
        head_multiple: head counts offered must be multiples of this (grouped-query attention).
    """

    name: str
    model: nn.Module
    example: Any
    output: Callable[[Any], torch.Tensor]
    keep_dims: set[str]
    width_dims: dict[str, tuple[int, set[str]]]
    head_dims: dict[str, int] = field(default_factory=dict)
    head_multiple: int = 1

    def run(self, model: nn.Module, example: Any = None) -> torch.Tensor:
        """``model`` called on the example (tuple -> args, dict -> kwargs), its output tensor picked."""
        with torch.no_grad():
            return self.output(call_model(model, self.example if example is None else example))

    def supernet(self, **kwargs: Any):
        """Wrap this family's model (a plain ``nn.Module``) in a ``SupernetModule``."""
        from lightning_supernet import SupernetModule

        return SupernetModule(self.model, _family_loss, example_input=self.example, output_transform=self.output,
                              **kwargs)


def _family_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _tiny_vit() -> Family:
    model = TinyViT(img_size=8, patch_size=2, in_chans=1, dim=32, depth=4, num_heads=4, num_classes=10).eval()
    return Family(
        "tiny_vit", model, torch.randn(2, 1, 8, 8), _logits,
        keep_dims={f"blocks.{i}.keep" for i in range(4)},
        width_dims={f"blocks.{i}.mlp.fc1.width": (128, {f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"})
                    for i in range(4)},
        head_dims={f"blocks.{i}.attn.heads": 4 for i in range(4)},
    )


def _resnet_like() -> Family:
    from lightning_supernet.models import ResNetLike

    model = ResNetLike(in_chans=1, widths=(32, 64), depths=(2, 2), num_classes=10).eval()
    # give BatchNorm non-trivial running statistics and affine parameters, so eval-mode outputs depend on them
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.2, 0.2)
    widths = {}
    for stage, mid in ((0, 8), (1, 16)):
        for block in range(2):
            p = f"layers.{stage}.{block}"
            widths[f"{p}.conv1.width"] = (mid, {f"{p}.conv1", f"{p}.bn1", f"{p}.conv2"})
            widths[f"{p}.conv2.width"] = (mid, {f"{p}.conv2", f"{p}.bn2", f"{p}.conv3"})
    return Family(
        "resnet_like", model, torch.randn(2, 1, 8, 8), _logits,
        # layers.1.0 changes the shape (stride 2, 32 -> 64 channels): not skippable
        keep_dims={"layers.0.0.keep", "layers.0.1.keep", "layers.1.1.keep"},
        width_dims=widths,
    )


def _bert() -> Family:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # one padded sequence, so the attention mask matters
    p = "bert.encoder.layer"
    return Family(
        "bert", model, {"input_ids": ids, "attention_mask": mask}, _logits,
        keep_dims={f"{p}.{i}.keep" for i in range(4)},
        width_dims={f"{p}.{i}.intermediate.dense.width": (128, {f"{p}.{i}.intermediate.dense",
                                                                f"{p}.{i}.output.dense"}) for i in range(4)},
        head_dims={f"{p}.{i}.attention.heads": 4 for i in range(4)},
    )


def _llama() -> Family:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    p = "model.layers"
    return Family(
        "llama", model, {"input_ids": ids, "use_cache": False}, _logits,
        keep_dims={f"{p}.{i}.keep" for i in range(4)},
        width_dims={f"{p}.{i}.mlp.gate_proj.width": (128, {f"{p}.{i}.mlp.gate_proj", f"{p}.{i}.mlp.up_proj",
                                                           f"{p}.{i}.mlp.down_proj"}) for i in range(4)},
        head_dims={f"{p}.{i}.self_attn.heads": 4 for i in range(4)},
        head_multiple=2,  # 4 query heads share 2 key/value heads
    )


def _sam() -> Family:
    from segment_anything.modeling import ImageEncoderViT

    model = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, out_chans=32,
                            window_size=2, global_attn_indexes=(1, 3), use_rel_pos=True).eval()
    with torch.no_grad():  # SAM zero-initialises its relative positions; make them matter
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.1)
    return Family(
        "sam", model, torch.randn(1, 3, 64, 64), _logits,
        keep_dims={f"blocks.{i}.keep" for i in range(4)},
        width_dims={f"blocks.{i}.mlp.lin1.width": (256, {f"blocks.{i}.mlp.lin1", f"blocks.{i}.mlp.lin2"})
                    for i in range(4)},
        head_dims={f"blocks.{i}.attn.heads": 4 for i in range(4)},
    )


_BUILDERS: dict[str, Callable[[], Family]] = {
    "tiny_vit": _tiny_vit, "resnet_like": _resnet_like, "bert": _bert, "llama": _llama, "sam": _sam,
}


def build_family(name: str, seed: int = 0) -> Family:
    """A fresh, seeded model of family ``name`` (one of :data:`FAMILY_NAMES`)."""
    seed_everything(seed)
    return _BUILDERS[name]()


@pytest.fixture(scope="session")
def make_family() -> Callable[..., Family]:
    """The builder itself, for fixtures of any scope: ``make_family("bert")``."""
    return build_family


@pytest.fixture(params=FAMILY_NAMES, scope="module")
def family(request: pytest.FixtureRequest) -> Family:
    """Each of the five families in turn (one fresh model per test module)."""
    return build_family(request.param)


@pytest.fixture
def tiny_vit() -> Family:
    return build_family("tiny_vit")


@pytest.fixture
def resnet_like() -> Family:
    return build_family("resnet_like")


@pytest.fixture
def bert() -> Family:
    return build_family("bert")


@pytest.fixture
def llama() -> Family:
    return build_family("llama")


@pytest.fixture
def sam_encoder() -> Family:
    return build_family("sam")


# -- Lightning ----------------------------------------------------------------------------------------------------
class RandomImages(torch.utils.data.Dataset):
    """``n`` random 1x8x8 images with labels in ``[0, num_classes)`` (fixed by ``seed``)."""

    def __init__(self, n: int = 32, num_classes: int = 10, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 8, 8, generator=gen)
        self.y = torch.randint(0, num_classes, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class LitTinyViT(pl.LightningModule):
    """A user's LightningModule: TinyViT, cross-entropy, its own metric names, AdamW."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = TinyViT(img_size=8, patch_size=2, in_chans=1, dim=32, depth=2, num_heads=2, num_classes=10)
        self.example_input_array = torch.randn(2, 1, 8, 8)
        self.epochs_ended = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("user_train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("user_val_loss", F.cross_entropy(logits, y))
        self.log("user_val_acc", (logits.argmax(-1) == y).float().mean())

    def on_train_epoch_end(self) -> None:
        self.epochs_ended += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@pytest.fixture
def lit_tiny_vit() -> Any:
    """A fresh ``LitTinyViT`` (a LightningModule around a depth-2 TinyViT, ``example_input_array`` set)."""
    seed_everything(0)
    return LitTinyViT()


@pytest.fixture
def make_lit_tiny_vit() -> Callable[..., LitTinyViT]:
    """The ``LitTinyViT`` class, to build more instances in a test."""
    return LitTinyViT


@pytest.fixture
def random_images() -> RandomImages:
    """32 random 1x8x8 images with 10-class labels."""
    return RandomImages()
