"""Wan 2.1 T2V's embedded configs (diffusers' `WanPipeline` layout, ``Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers``):
the full-size transformer / VAE / scheduler / umT5 configs and the shrunken ones of the tiny random-weight model.
Plain data: no torch, diffusers or transformers import.
"""
from __future__ import annotations

import types
from typing import Any, Mapping

from models.registry import WAN_NUM_LAYERS_14B, WAN_TINY_NUM_LAYERS

# The text encoder's sequence: WanPipeline's max_sequence_length (prompts are padded / truncated to it).
WAN_TEXT_TOKENS = 512

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json (the hub repo's values; shared/model-configs is not
# available at run time). The 14B has the same classes with `WAN_14B_TRANSFORMER_OVERRIDES`.
WAN_1_3B_TRANSFORMER_CONFIG = types.MappingProxyType({
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": (1, 2, 2),
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
})
WAN_14B_TRANSFORMER_OVERRIDES = types.MappingProxyType(
    {"num_attention_heads": 40, "num_layers": WAN_NUM_LAYERS_14B, "ffn_dim": 13824})
# vae/config.json of the same repo (both sizes share the VAE).
WAN_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916)
WAN_VAE_CONFIG = types.MappingProxyType({
    "attn_scales": (),
    "base_dim": 96,
    "dim_mult": (1, 2, 4, 4),
    "dropout": 0.0,
    "latents_mean": WAN_LATENTS_MEAN,
    "latents_std": WAN_LATENTS_STD,
    "num_res_blocks": 2,
    "temperal_downsample": (False, True, True),
    "z_dim": 16,
})
# scheduler/scheduler_config.json of the same repo: UniPC (bh2, order 2) on flow sigmas with shift 3.0 (480p).
WAN_SCHEDULER_CONFIG = types.MappingProxyType({
    "_class_name": "UniPCMultistepScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "disable_corrector": [],
    "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "predict_x0": True,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_p": None,
    "solver_type": "bh2",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
})
# text_encoder/config.json (google/umt5-xxl encoder); the tiny encoder keeps its structure with small widths.
WAN_UMT5_CONFIG = types.MappingProxyType({
    "classifier_dropout": 0.0,
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "scalable_attention": True,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 256384,
})

# Tiny components: the real classes and module paths, shrunken widths. 2 heads of 12 (the rotary embedding
# splits each head into time / height / width parts), 6 blocks, text width 32.
TINY_WAN_TRANSFORMER_CONFIG = types.MappingProxyType({
    **WAN_1_3B_TRANSFORMER_CONFIG,
    "attention_head_dim": 12,
    "ffn_dim": 48,
    "num_attention_heads": 2,
    "num_layers": WAN_TINY_NUM_LAYERS,
    "text_dim": 32,
})
# 4 levels keep the real 8x spatial and 4x temporal factors; z_dim 16 keeps the real latents mean / std.
TINY_WAN_VAE_CONFIG = types.MappingProxyType({
    **WAN_VAE_CONFIG,
    "base_dim": 4,
    "dim_mult": (1, 1, 1, 1),
    "num_res_blocks": 1,
})
TINY_UMT5_OVERRIDES = types.MappingProxyType({
    "d_ff": 64, "d_kv": 8, "d_model": TINY_WAN_TRANSFORMER_CONFIG["text_dim"], "num_decoder_layers": 2,
    "num_heads": 4, "num_layers": 2,
})
TINY_WAN_MODEL_INDEX = types.MappingProxyType({
    "_class_name": "WanPipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
})
_SEED_OFFSETS = {"transformer": 0, "vae": 1, "text_encoder": 2}


def _config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh, mutable dict of an embedded config (tuples become lists: diffusers concatenates some as lists)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


def wan_transformer_config(size: str = "1.3b") -> dict[str, Any]:
    """The full-size transformer config of Wan 2.1 T2V ``"1.3b"`` or ``"14b"``."""
    if size not in ("1.3b", "14b"):
        raise ValueError(f"Wan 2.1 T2V comes in '1.3b' and '14b', got {size!r}")
    return _config_dict({**WAN_1_3B_TRANSFORMER_CONFIG, **(WAN_14B_TRANSFORMER_OVERRIDES if size == "14b" else {})})
