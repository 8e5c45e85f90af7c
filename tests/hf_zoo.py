"""Small-config builders of the Hugging Face architectures issue 9/10 list (test helper, not a test module).

``HF_ZOO[name](layers)`` returns ``(model, example_input)``: the real ``transformers`` class built from a small
config (no download), with dropout and layer-drop off. ``python tests/hf_zoo.py [names...]`` runs the conformance
contract on each and prints one line per model.

Example:
    >>> model, example = HF_ZOO["bert"](2)
    >>> type(model).__name__
    'BertForSequenceClassification'
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

V = 64  # vocabulary size


def _ids(n: int = 6, b: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (b, n), generator=torch.Generator().manual_seed(0))


def _text(cls_name: str, cfg_name: str, layers: int, head: str = "ForSequenceClassification", causal: bool = False,
          **kw: Any) -> tuple[torch.nn.Module, dict]:
    import transformers as t

    cfg_kw = dict(vocab_size=V, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    cfg_kw.update(kw)
    cfg = getattr(t, cfg_name)(**cfg_kw)
    if hasattr(cfg, "pad_token_id") and cfg.pad_token_id is None:
        cfg.pad_token_id = 0
    model = getattr(t, cls_name + head)(cfg).eval()
    example: dict[str, Any] = {"input_ids": _ids()}
    if causal:
        example["use_cache"] = False
    return model, example


def _image(cls: str, cfg_name: str, **kw: Any) -> tuple[torch.nn.Module, dict]:
    import transformers as t

    cfg = getattr(t, cfg_name)(**kw)
    size = kw.get("image_size", 32)
    pixels = torch.randn(2, kw.get("num_channels", 3), size, size, generator=torch.Generator().manual_seed(0))
    return getattr(t, cls)(cfg).eval(), {"pixel_values": pixels}


def bert(n: int): return _text("Bert", "BertConfig", n)
def roberta(n: int): return _text("Roberta", "RobertaConfig", n, pad_token_id=1)
def electra(n: int): return _text("Electra", "ElectraConfig", n, embedding_size=32)
def albert(n: int): return _text("Albert", "AlbertConfig", n, embedding_size=16)
def deberta_v2(n: int): return _text("DebertaV2", "DebertaV2Config", n, relative_attention=True,
                                     position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"])
def gpt2(n: int): return _text("GPT2", "GPT2Config", n, "LMHeadModel", True, n_embd=32, n_layer=n, n_head=4,
                               n_positions=64)
def gpt_neox(n: int): return _text("GPTNeoX", "GPTNeoXConfig", n, "ForCausalLM", True)
def gptj(n: int): return _text("GPTJ", "GPTJConfig", n, "ForCausalLM", True, n_embd=32, n_layer=n, n_head=4,
                               rotary_dim=4, n_positions=64)
def opt(n: int): return _text("OPT", "OPTConfig", n, "ForCausalLM", True, ffn_dim=64, word_embed_proj_dim=32)
def bloom(n: int): return _text("Bloom", "BloomConfig", n, "ForCausalLM", True, n_layer=n, n_head=4)
def falcon(n: int): return _text("Falcon", "FalconConfig", n, "ForCausalLM", True, new_decoder_architecture=True,
                                 num_kv_heads=2)
def llama(n: int): return _text("Llama", "LlamaConfig", n, "ForCausalLM", True, num_key_value_heads=2)
def mistral(n: int): return _text("Mistral", "MistralConfig", n, "ForCausalLM", True, num_key_value_heads=2)
def qwen2(n: int): return _text("Qwen2", "Qwen2Config", n, "ForCausalLM", True, num_key_value_heads=2)
def phi(n: int): return _text("Phi", "PhiConfig", n, "ForCausalLM", True, partial_rotary_factor=0.5)
def gemma(n: int): return _text("Gemma", "GemmaConfig", n, "ForCausalLM", True, num_key_value_heads=2, head_dim=8)
def mixtral(n: int): return _text("Mixtral", "MixtralConfig", n, "ForCausalLM", True, num_key_value_heads=2,
                                  num_local_experts=4, num_experts_per_tok=2)


def distilbert(n: int):
    return _text("DistilBert", "DistilBertConfig", n, dim=32, n_layers=n, n_heads=4, hidden_dim=64)


def t5(n: int):
    import transformers as t

    cfg = t.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=n, num_heads=4,
                     relative_attention_num_buckets=8, dropout_rate=0.0)
    return t.T5EncoderModel(cfg).eval(), {"input_ids": _ids()}


def bart(n: int):
    import transformers as t

    cfg = t.BartConfig(vocab_size=V, d_model=32, encoder_layers=n, decoder_layers=n, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                       encoder_layerdrop=0.0, decoder_layerdrop=0.0)
    return t.BartForConditionalGeneration(cfg).eval(), {"input_ids": _ids(), "use_cache": False}


def vit(n: int): return _image("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=32,
                               num_hidden_layers=n, num_attention_heads=4, intermediate_size=64, num_labels=3)
def deit(n: int): return _image("DeiTForImageClassification", "DeiTConfig", image_size=32, patch_size=8,
                                hidden_size=32, num_hidden_layers=n, num_attention_heads=4, intermediate_size=64,
                                num_labels=3)
def swin(n: int): return _image("SwinForImageClassification", "SwinConfig", image_size=32, patch_size=2, embed_dim=16,
                                depths=[max(n // 2, 1), max(n - n // 2, 1)], num_heads=[2, 4], window_size=4,
                                num_labels=3)
def convnext(n: int): return _image("ConvNextForImageClassification", "ConvNextConfig", image_size=32,
                                    hidden_sizes=[16, 32], depths=[max(n // 2, 1), max(n - n // 2, 1)], num_stages=2,
                                    num_labels=3)
def clip_vision(n: int): return _image("CLIPVisionModel", "CLIPVisionConfig", image_size=32, patch_size=8,
                                       hidden_size=32, num_hidden_layers=n, num_attention_heads=4,
                                       intermediate_size=64)


def whisper_encoder(n: int):
    import transformers as t

    cfg = t.WhisperConfig(vocab_size=V, d_model=32, encoder_layers=n, decoder_layers=1, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
                          max_source_positions=16, encoder_layerdrop=0.0)
    feats = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    return t.WhisperForAudioClassification(cfg).eval(), {"input_features": feats}


def wav2vec2(n: int):
    import transformers as t

    cfg = t.Wav2Vec2Config(vocab_size=V, hidden_size=32, num_hidden_layers=n, num_attention_heads=4,
                           intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                           num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, layerdrop=0.0,
                           mask_time_prob=0.0, num_labels=3)
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(0))
    return t.Wav2Vec2ForSequenceClassification(cfg).eval(), {"input_values": audio}


def olmo(n: int): return _text("Olmo", "OlmoConfig", n, "ForCausalLM", True)


def mobilevit(n: int):
    return _image("MobileViTForImageClassification", "MobileViTConfig", image_size=32, patch_size=2,
                  hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_attention_heads=2,
                  num_labels=3)


def segformer(n: int):
    import transformers as t

    cfg = t.SegformerConfig(num_encoder_blocks=2, depths=[max(n // 2, 1), max(n - n // 2, 1)], sr_ratios=[2, 1],
                            hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
                            mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=3)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return t.SegformerForSemanticSegmentation(cfg).eval(), {"pixel_values": pixels}


#: models the issue names for the export finaliser (head size from the config, several stacks), beyond the list
EXTRA: dict[str, Callable[[int], tuple[torch.nn.Module, dict]]] = {
    "olmo": olmo, "mobilevit": mobilevit, "segformer": segformer,
}

HF_ZOO: dict[str, Callable[[int], tuple[torch.nn.Module, dict]]] = {
    "bert": bert, "roberta": roberta, "distilbert": distilbert, "albert": albert, "electra": electra,
    "deberta_v2": deberta_v2, "gpt2": gpt2, "gpt_neox": gpt_neox, "gptj": gptj, "opt": opt, "bloom": bloom,
    "falcon": falcon, "llama": llama, "mistral": mistral, "qwen2": qwen2, "phi": phi, "gemma": gemma, "t5": t5,
    "bart": bart, "vit": vit, "deit": deit, "swin": swin, "convnext": convnext, "clip_vision": clip_vision,
    "whisper_encoder": whisper_encoder, "wav2vec2": wav2vec2, "mixtral": mixtral,
}


def check(name: str, layers: int = 2, **kw: Any) -> Any:
    """Run the conformance contract on one zoo model (``kw`` goes to ``check_conformance``)."""
    from lightning_supernet.testing import check_conformance

    model, example = {**HF_ZOO, **EXTRA}[name](layers)
    return check_conformance(model, example, name=f"{name}[{layers}]", **kw)


if __name__ == "__main__":
    import time

    torch.manual_seed(0)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    layers = int(next((a.split("=")[1] for a in sys.argv[1:] if a.startswith("--layers=")), 2))
    for name in args or list(HF_ZOO):
        t0 = time.perf_counter()
        try:
            rep = check(name, layers)
            print(rep, f"frac={rep.smallest_fraction} dims={rep.dims} {time.perf_counter() - t0:.1f}s", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"{name:38s} HARNESS-ERROR {type(err).__name__}: {str(err)[:300]}", flush=True)
