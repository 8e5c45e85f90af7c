"""Hugging Face integration: configs of extracted subnets, save/reload, generation, errors, training.

Every model is built from a config (no downloads); outputs are compared numerically: the supernet under a config,
the extracted subnet, and the subnet after a save/reload round trip.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from lightning_supernet import SupernetModule  # noqa: E402
from lightning_supernet.integrations.transformers import (  # noqa: E402
    NonUniformSubnetError,
    load_subnet,
    output_logits,
    save_subnet,
    uniform_subnet,
)
from lightning_supernet.integrations._subnet_io import SubnetFormatError  # noqa: E402

IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def _bert(head: str = "cls", **kw: Any) -> tuple[torch.nn.Module, dict]:
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32,
                                     num_labels=3 if head == "cls" else 2, **kw)
    cls = transformers.BertForSequenceClassification if head == "cls" else transformers.BertForQuestionAnswering
    mask = torch.ones_like(IDS)
    mask[1, 9:] = 0
    return cls(config).eval(), {"input_ids": IDS, "attention_mask": mask}


def _vit(**kw: Any) -> tuple[torch.nn.Module, dict]:
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=4,
                                    num_attention_heads=4, intermediate_size=128, num_labels=5, **kw)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return transformers.ViTForImageClassification(config).eval(), {"pixel_values": x}


def _llama(**kw: Any) -> tuple[torch.nn.Module, dict]:
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64, **kw)
    return transformers.LlamaForCausalLM(config).eval(), {"input_ids": IDS, "use_cache": False}


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, dict]]] = {
    "bert_cls": _bert, "bert_qa": lambda: _bert("qa"), "vit": _vit, "llama": _llama,
}


def _supernet(model: torch.nn.Module, example: dict, **kw: Any) -> SupernetModule:
    return SupernetModule(model, F.cross_entropy, example_input=example, output_transform=output_logits, **kw)


def _out(model: torch.nn.Module, example: dict) -> torch.Tensor:
    with torch.no_grad():
        return output_logits(model(**example))


def _under(supernet: SupernetModule, cfg: Any, example: dict) -> torch.Tensor:
    with supernet.subnet(cfg):
        return _out(supernet, example)


@pytest.fixture(scope="module", params=list(MODELS))
def built(request: pytest.FixtureRequest) -> tuple[str, SupernetModule, dict]:
    torch.manual_seed(0)
    model, example = MODELS[request.param]()
    return request.param, _supernet(model, example), example


# -- uniform subnets: the config describes them, save_pretrained/from_pretrained round trip ------------------------
def test_uniform_subnet_round_trips_through_save_pretrained(built, tmp_path) -> None:
    name, supernet, example = built
    heads = 2 if name == "llama" else None  # BERT/ViT configs have no `head_dim`: heads stay full
    cfg = uniform_subnet(supernet, num_layers=2, intermediate_size=64, num_attention_heads=heads)
    expected = _under(supernet, cfg, example)
    small = supernet.extract(cfg).eval()
    assert small.supernet_format_issue is None
    c = small.config
    assert (c.num_hidden_layers, c.intermediate_size) == (2, 64)
    if name == "llama":
        assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, 16)
    torch.testing.assert_close(_out(small, example), expected)
    assert not torch.allclose(expected, _out(supernet, example))  # the subnet really differs from the full model
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_out(reloaded, example), expected)
    # the supernet's own model and config are untouched
    assert supernet.model.config.num_hidden_layers == 4 and supernet.model.config.intermediate_size == 128


def test_non_uniform_subnet_refuses_save_pretrained_and_round_trips(built, tmp_path) -> None:
    name, supernet, example = built
    space = supernet.search_space
    widths = [n for n, d in space.dims.items() if d.kind == "width" and d.largest == 128]
    keeps = [n for n, d in space.dims.items() if d.kind == "depth"]
    cfg = space.config({widths[0]: 32, widths[2]: 96, keeps[1]: False})
    expected = _under(supernet, cfg, example)
    small = supernet.extract(cfg).eval()
    torch.testing.assert_close(_out(small, example), expected)
    assert small.config.num_hidden_layers == 3  # depth is always describable
    with pytest.raises(NonUniformSubnetError, match=r"intermediate_size \[32, 96, 128\].*save_subnet"):
        small.save_pretrained(tmp_path / "hf")
    save_subnet(small, tmp_path / "subnet")
    assert sorted(os.listdir(tmp_path / "subnet")) == ["config.json", "subnet.json", "subnet.safetensors"]
    layout = json.loads((tmp_path / "subnet" / "subnet.json").read_text())
    assert len(layout["shapes"]) == 6  # two layers: MLP in (weight, bias) + out (weight), or gate + up + down
    reloaded = load_subnet(tmp_path / "subnet")
    assert type(reloaded) is type(small)
    torch.testing.assert_close(_out(reloaded, example), expected)
    with pytest.raises(NonUniformSubnetError):  # the reloaded model still says why HF's format cannot hold it
        reloaded.save_pretrained(tmp_path / "hf2")


def test_fewer_heads_without_head_dim_is_explained(tmp_path) -> None:
    model, example = _bert()
    supernet = _supernet(model, example)
    cfg = uniform_subnet(supernet, num_attention_heads=2)
    small = supernet.extract(cfg).eval()
    assert "has no `head_dim`" in small.supernet_format_issue
    torch.testing.assert_close(_out(small, example), _under(supernet, cfg, example))
    save_subnet(small, tmp_path)
    torch.testing.assert_close(_out(load_subnet(tmp_path), example), _under(supernet, cfg, example))


# -- decoder LM: generation with the KV cache after extraction and reload -----------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama_generates_the_same_tokens_after_extract_and_reload(attn: str, tmp_path) -> None:
    model, example = _llama(attn_implementation=attn)
    supernet = _supernet(model, example)
    cfg = uniform_subnet(supernet, layers=[1, 3], intermediate_size=64, num_attention_heads=2)
    mask = torch.ones_like(IDS)
    gen = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with supernet.subnet(cfg):
        expected = supernet.model.generate(IDS, **gen)
    small = supernet.extract(cfg).eval()
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1]  # the cache is indexed by it
    assert torch.equal(small.generate(IDS, **gen), expected)
    small.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=attn).eval()
    assert torch.equal(reloaded.generate(IDS, **gen), expected)


# -- output transform, errors -------------------------------------------------------------------------------------
def test_output_logits() -> None:
    from transformers.modeling_outputs import QuestionAnsweringModelOutput, SequenceClassifierOutput

    logits = torch.randn(2, 3)
    assert output_logits(SequenceClassifierOutput(logits=logits)) is logits
    qa = output_logits(QuestionAnsweringModelOutput(start_logits=torch.zeros(2, 5), end_logits=torch.ones(2, 5)))
    assert qa.shape == (2, 5, 2) and qa[..., 1].eq(1).all()
    assert output_logits({"logits": logits}) is logits
    with pytest.raises(TypeError, match="output_transform"):
        output_logits({"loss": None})


def test_distilbert_heads_are_found_and_verified_without_an_adapter_of_its_own() -> None:
    """DistilBERT's ``q_lin/k_lin/v_lin/out_lin`` with ``n_heads`` and a size attribute ``dim``: the separate-q/k/v
    adapter proposes it, and verification confirms that ``dim`` follows the heads (it is ``heads * head_dim``)."""
    config = transformers.DistilBertConfig(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                           max_position_embeddings=32)
    model = transformers.DistilBertForSequenceClassification(config).eval()
    example = {"input_ids": IDS}
    supernet = _supernet(model, example)
    spec = supernet.discovery.heads[0].spec
    assert (spec.q, spec.o, spec.head_attrs, spec.size_attrs) == ("q_lin", "out_lin", (("", "n_heads"),), (("", "dim"),))
    cfg = supernet.search_space.config({"distilbert.transformer.layer.0.attention.heads": 2})
    small = supernet.extract(cfg).eval()
    assert small.distilbert.transformer.layer[0].attention.q_lin.out_features == 32
    torch.testing.assert_close(_out(small, example), _under(supernet, cfg, example))
    # heads fixed on request: DistilBertConfig's own names (n_layers, hidden_dim) are updated
    fixed = _supernet(transformers.DistilBertForSequenceClassification(config).eval(), example,
                      space={"elastic": ["width", "depth"]})
    small = fixed.extract(uniform_subnet(fixed, num_layers=1, intermediate_size=64))
    assert (small.config.n_layers, small.config.hidden_dim, small.supernet_format_issue) == (1, 64, None)


def test_save_and_load_errors(tmp_path) -> None:
    with pytest.raises(TypeError, match="`model` must be a transformers PreTrainedModel"):
        save_subnet(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(SubnetFormatError, match="holds no subnet.json"):
        load_subnet(tmp_path / "missing")
    model, example = _vit()
    supernet = _supernet(model, example)
    with pytest.raises(ValueError, match="`num_layers` is 9; allowed: 1..4"):
        uniform_subnet(supernet, num_layers=9)
    with pytest.raises(ValueError, match="has value 50; allowed: 32, 64, 96, 128"):
        uniform_subnet(supernet, intermediate_size=50)


# -- a user's LightningModule around a Hugging Face model, trained with the sandwich rule --------------------------
class TextClassifier(__import__("lightning").pytorch.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model, example = _bert()
        self.example_input_array = example

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        loss = F.cross_entropy(self(ids).logits, labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids, labels = batch
        self.log("val_acc", (self(ids).logits.argmax(-1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_lightning_module_holding_a_bert_trains_and_exports(tmp_path) -> None:
    import lightning as L

    from lightning_supernet.callbacks import InplaceDistillation, SandwichSampling

    torch.manual_seed(0)
    supernet = SupernetModule(TextClassifier(), output_transform=output_logits, eval_subnets=("largest",))
    data = torch.utils.data.TensorDataset(torch.randint(0, 100, (8, 12)), torch.randint(0, 3, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, callbacks=[SandwichSampling(num_random=1),
                        InplaceDistillation()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(supernet, loader, loader)
    changed = [k for k, v in supernet.state_dict().items() if not torch.equal(v, before[k])]
    assert any(".intermediate.dense." in k for k in changed)
    assert "val_acc" in trainer.callback_metrics
    cfg = uniform_subnet(supernet, num_layers=3, intermediate_size=32)
    small = supernet.extract(cfg).eval()
    assert isinstance(small, TextClassifier) and small.model.config.num_hidden_layers == 3
    small.model.save_pretrained(tmp_path)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = IDS[:, :10]
    supernet.eval()
    with supernet.subnet(cfg), torch.no_grad():
        expected = supernet(ids).logits
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
