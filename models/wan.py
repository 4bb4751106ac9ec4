"""Wan 2.1 T2V (a DiT trained with flow matching): the public names of its modules, in one place.

- `models.wan_configs`: the embedded full-size and tiny configs (plain data);
- `models.wan_text`: the umT5 tokenizer (tiny one built offline), prompt encoding, token positions of phrases;
- `models.schedulers`: UniPC with its corrector off on the first steps (`build_wan_scheduler`);
- `models.wan_model`: `WanVideoModel`, assembling and loading components, decoding latents;
- `models.wan_tiny`: tiny and full-size random-weight models, and saving the tiny one as a hub-like folder.
Loading a run-model's weights is `models.loading.load_video_model` (both families).
"""
from __future__ import annotations

from models.schedulers import build_wan_scheduler, corrector_off_steps_of
from models.wan_configs import (TINY_UMT5_OVERRIDES, TINY_WAN_MODEL_INDEX, TINY_WAN_TRANSFORMER_CONFIG,
                                TINY_WAN_VAE_CONFIG, WAN_1_3B_TRANSFORMER_CONFIG, WAN_14B_TRANSFORMER_OVERRIDES,
                                WAN_LATENTS_MEAN, WAN_LATENTS_STD, WAN_SCHEDULER_CONFIG, WAN_TEXT_TOKENS,
                                WAN_UMT5_CONFIG, WAN_VAE_CONFIG, wan_transformer_config)
from models.wan_model import (WAN_MODEL_CONFIG_FILES, WAN_MODEL_WEIGHT_FOLDERS, WanVideoModel, assemble_wan_model,
                              cast_wan_transformer, decode_wan_latents, load_wan_components_from_folder,
                              resolve_wan_model_folder, wan_latent_num_frames)
from models.wan_text import (EOS_TOKEN, PAD_TOKEN, SPIECE_SPACE, TINY_UMT5_PIECES, TINY_UMT5_WORDS, UNK_TOKEN,
                             build_tiny_umt5_tokenizer, clean_prompt, compute_wan_token_positions,
                             encode_wan_prompts, load_wan_tokenizer)
from models.wan_tiny import (build_random_wan_model, build_tiny_wan_components, build_tiny_wan_model,
                             save_tiny_wan_model)

__all__ = [
    "TINY_UMT5_OVERRIDES", "TINY_WAN_MODEL_INDEX", "TINY_WAN_TRANSFORMER_CONFIG", "TINY_WAN_VAE_CONFIG",
    "WAN_1_3B_TRANSFORMER_CONFIG", "WAN_14B_TRANSFORMER_OVERRIDES", "WAN_LATENTS_MEAN", "WAN_LATENTS_STD",
    "WAN_SCHEDULER_CONFIG", "WAN_TEXT_TOKENS", "WAN_UMT5_CONFIG", "WAN_VAE_CONFIG", "wan_transformer_config",
    "WAN_MODEL_CONFIG_FILES", "WAN_MODEL_WEIGHT_FOLDERS", "WanVideoModel", "assemble_wan_model",
    "cast_wan_transformer", "decode_wan_latents", "load_wan_components_from_folder", "resolve_wan_model_folder",
    "wan_latent_num_frames", "EOS_TOKEN", "PAD_TOKEN", "SPIECE_SPACE", "TINY_UMT5_PIECES", "TINY_UMT5_WORDS",
    "UNK_TOKEN", "build_tiny_umt5_tokenizer", "clean_prompt", "compute_wan_token_positions", "encode_wan_prompts",
    "load_wan_tokenizer", "build_random_wan_model", "build_tiny_wan_components", "build_tiny_wan_model",
    "save_tiny_wan_model", "build_wan_scheduler", "corrector_off_steps_of",
]
