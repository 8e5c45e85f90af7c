"""Hugging Face architectures built from small configs (no download), dropout off, eval mode.

Every family issue 9 names, at 2 layers with hidden size 32-64, plus 12-layer configs of each family kind: text
encoder (BERT, T5 encoder), decoder LM (GPT-2, Llama), mixture of experts (Mixtral), vision (ViT), audio
(Whisper encoder). Text encoders get an attention mask with one padded sequence; decoders ``use_cache=False``.

Example:
    >>> names = {m.name for m in hf_zoo()}
    >>> {"bert", "bert_12l", "mixtral", "wav2vec2"} <= names
    True
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_supernet.testing.zoo import ZooModel, seeded

__all__ = ["hf_zoo"]

VOCAB, SEQ = 100, 12


def _build(config_name: str, model_name: str, **kwargs: Any) -> Any:
    def build() -> Any:
        import transformers

        config = getattr(transformers, config_name)(**kwargs)
        for key, value in config.to_dict().items():  # dropout off: train-mode outputs are then deterministic
            if isinstance(value, float) and ("dropout" in key or "layerdrop" in key or key.endswith("_pdrop")):
                setattr(config, key, 0.0)
        return getattr(transformers, model_name)(config).eval()

    return seeded(build)


def _text(mask: bool = True, **extra: Any) -> Any:
    def make() -> dict[str, Any]:
        ids = torch.randint(3, VOCAB, (2, SEQ))
        out: dict[str, Any] = {"input_ids": ids}
        if mask:
            m = torch.ones_like(ids)
            m[1, SEQ - 3:] = 0
            out["attention_mask"] = m
        out.update(extra)
        return out

    return seeded(make, 1)


def _image(size: int, channels: int = 3) -> Any:
    return seeded(lambda: {"pixel_values": torch.randn(2, channels, size, size)}, 1)


_BERT = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, num_labels=3)
_LM = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_labels=3)
_WHISPER = dict(vocab_size=VOCAB, d_model=32, encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
                decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
                max_target_positions=16, num_labels=3, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, decoder_start_token_id=1)
_MIXTRAL = dict(_LM, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


def _entries() -> list[tuple[str, Any, Any, bool]]:
    dec = _text(mask=False, use_cache=False)
    return [
        # text encoders
        ("bert", _build("BertConfig", "BertForSequenceClassification", num_hidden_layers=2, **_BERT), _text(), True),
        ("bert_12l", _build("BertConfig", "BertForSequenceClassification", num_hidden_layers=12, **_BERT), _text(),
         False),
        ("roberta", _build("RobertaConfig", "RobertaForSequenceClassification", num_hidden_layers=2,
                           **{**_BERT, "max_position_embeddings": 66}), _text(), False),
        ("distilbert", _build("DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=VOCAB, dim=32,
                              n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=3),
         _text(), False),
        ("albert", _build("AlbertConfig", "AlbertForSequenceClassification", embedding_size=16, num_hidden_layers=2,
                          **_BERT), _text(), False),
        ("electra", _build("ElectraConfig", "ElectraForSequenceClassification", embedding_size=16,
                           num_hidden_layers=2, **_BERT), _text(), False),
        ("deberta_v2", _build("DebertaV2Config", "DebertaV2ForSequenceClassification", num_hidden_layers=2,
                              relative_attention=True, position_buckets=8, max_relative_positions=16,
                              pos_att_type=["p2c", "c2p"], **_BERT), _text(), False),
        ("t5_encoder", _build("T5Config", "T5EncoderModel", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                              num_layers=2, num_heads=4), _text(), False),
        ("t5_encoder_12l", _build("T5Config", "T5EncoderModel", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                                  num_layers=12, num_heads=4), _text(), False),
        ("bart", _build("BartConfig", "BartModel", vocab_size=VOCAB, d_model=32, encoder_layers=2,
                        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=64), _text(use_cache=False), False),
        # decoder LMs
        ("gpt2", _build("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                        n_positions=64, bos_token_id=0, eos_token_id=0), dec, True),
        ("gpt2_12l", _build("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=12, n_head=4,
                            n_positions=64, bos_token_id=0, eos_token_id=0), dec, False),
        ("gpt_neox", _build("GPTNeoXConfig", "GPTNeoXForCausalLM", num_hidden_layers=2, rotary_pct=0.5, **_LM),
         dec, False),
        ("gptj", _build("GPTJConfig", "GPTJForCausalLM", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                        rotary_dim=4, n_positions=64), dec, False),
        ("opt", _build("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, ffn_dim=64,
                       num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                       max_position_embeddings=64), dec, False),
        ("bloom", _build("BloomConfig", "BloomForCausalLM", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
         dec, False),
        ("falcon", _build("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=4), dec, False),
        ("llama", _build("LlamaConfig", "LlamaForCausalLM", num_hidden_layers=2, num_key_value_heads=2, **_LM),
         dec, True),
        ("llama_12l", _build("LlamaConfig", "LlamaForCausalLM", num_hidden_layers=12, num_key_value_heads=2, **_LM),
         dec, False),
        ("mistral", _build("MistralConfig", "MistralForCausalLM", num_hidden_layers=2, num_key_value_heads=2,
                           sliding_window=8, **_LM), dec, False),
        ("qwen2", _build("Qwen2Config", "Qwen2ForCausalLM", num_hidden_layers=2, num_key_value_heads=2, **_LM),
         dec, False),
        ("phi", _build("PhiConfig", "PhiForCausalLM", num_hidden_layers=2, partial_rotary_factor=0.5, **_LM),
         dec, False),
        ("gemma", _build("GemmaConfig", "GemmaForCausalLM", num_hidden_layers=2, num_key_value_heads=1, head_dim=8,
                         **_LM), dec, False),
        ("mixtral", _build("MixtralConfig", "MixtralForCausalLM", num_hidden_layers=2, **_MIXTRAL), dec, False),
        ("mixtral_12l", _build("MixtralConfig", "MixtralForCausalLM", num_hidden_layers=12, **_MIXTRAL), dec, False),
        # vision
        ("vit", _build("ViTConfig", "ViTForImageClassification", num_hidden_layers=2, **_VIT), _image(32), True),
        ("vit_12l", _build("ViTConfig", "ViTForImageClassification", num_hidden_layers=12, **_VIT), _image(32),
         False),
        ("deit", _build("DeiTConfig", "DeiTForImageClassification", num_hidden_layers=2, **_VIT), _image(32), False),
        ("swin", _build("SwinConfig", "SwinForImageClassification", image_size=32, patch_size=2, embed_dim=16,
                        depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=3), _image(32), False),
        ("convnext", _build("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[16, 32],
                            depths=[2, 2], num_stages=2, num_labels=3), _image(32), False),
        ("clip_vision", _build("CLIPVisionConfig", "CLIPVisionModel", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
         _image(32), False),
        # audio
        ("whisper_encoder", _build("WhisperConfig", "WhisperForAudioClassification", encoder_layers=2, **_WHISPER),
         seeded(lambda: {"input_features": torch.randn(2, 16, 32)}, 1), False),
        ("whisper_encoder_12l", _build("WhisperConfig", "WhisperForAudioClassification", encoder_layers=12,
                                       **_WHISPER), seeded(lambda: {"input_features": torch.randn(2, 16, 32)}, 1),
         False),
        ("wav2vec2", _build("Wav2Vec2Config", "Wav2Vec2ForSequenceClassification", hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(32, 32),
                            conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=4, layerdrop=0.0, mask_time_prob=0.0, num_labels=3,
                            classifier_proj_size=16), seeded(lambda: {"input_values": torch.randn(2, 800)}, 1),
         False),
    ]


def hf_zoo() -> list[ZooModel]:
    """The Hugging Face zoo (see the module docstring).

    Example:
        >>> sum(m.fast for m in hf_zoo()) >= 3
        True
    """
    return [ZooModel(name, build, example, fast=fast) for name, build, example, fast in _entries()]
