"""Wan 2.1 T2V (a DiT trained with flow matching) as one frozen `WanVideoModel`: building, loading, saving and
the umT5 text side (prompt encoding as `WanPipeline` does it, and the token positions of object phrases).

Components (diffusers' `WanPipeline` layout, ``Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers``):
- ``transformer``: `WanTransformer3DModel` (1.3B: 30 blocks, 12 heads x 128; 14B: 40 blocks, 40 heads x 128);
- ``vae``: `AutoencoderKLWan` (8x space; time: frame 0 alone, then groups of 4 frames per latent frame), fp32
  by default as diffusers recommends; latents are normalised by its ``latents_mean`` / ``latents_std``;
- ``text_encoder``: `UMT5EncoderModel` (umT5-XXL, 5.7B parameters) with its `T5TokenizerFast` (sentencepiece
  unigram, no BOS, ``</s>`` appended), 512 tokens, zero-padded after the prompt's own tokens;
- ``scheduler``: `UniPCMultistepScheduler` (flow prediction, flow shift 3.0), optionally with its corrector
  switched off on the first steps (``corrector_off_steps``, see `build_wan_scheduler`).

Tiny random-weight components keep the real classes and module paths (``blocks.<i>.attn2``) with shrunken
widths, and a small unigram tokenizer with the structure of umT5's, built offline from a word list
(`build_tiny_umt5_tokenizer`). Full-size random models (benchmarks, FLOP counts on the meta device) are built
from the embedded 1.3B configs (`WAN_1_3B_TRANSFORMER_CONFIG`; the 14B differs in width and depth only).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import types
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.video_processor import VideoProcessor
from tokenizers import Regex, Tokenizer, decoders, models as tokenizer_models, normalizers, pre_tokenizers, processors
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from models.devices import build_seeded, resolve_device, resolve_dtype
from models.hub import MissingWeightsError
from models.registry import WAN_NUM_LAYERS_14B, WAN_TINY_NUM_LAYERS, RunModelSpec, get_run_model
from models.weights import WAN_MODEL_CONFIG_FILES, WAN_MODEL_WEIGHT_FOLDERS, find_model_folder  # noqa: F401
from utils.io import atomic_folder, atomic_write_json
from utils.layout import LayoutValidationError, refine_phrase

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

# umT5's special tokens (no BOS): <pad> = 0, </s> = 1, <unk> = 2.
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
SPIECE_SPACE = "\u2581"  # sentencepiece's word-start marker
# The tiny tokenizer's vocabulary: whole words of the demo and benchmark prompts (one piece each), a few words
# split into pieces (multi-piece phrases in tests), then every printable ASCII character with and without the
# word-start marker (so any ASCII text tokenises). Scores are unigram log-probabilities: words beat pieces,
# pieces beat characters.
TINY_UMT5_WORDS = (
    "a", "A", "an", "the", "of", "with", "and", "in", "to", "from", "on", "its", "it", "which", "is", "only",
    "first", "second", "half", "then", "moves", "walks", "initially", "appears", "realistic", "lively", "video",
    "scene", "top", "down", "viewed", "moving", "walking", "flying", "left", "right", "upper", "lower", "one",
    "two", "three", "four", "car", "cars", "cat", "cats", "bird", "birds", "ball", "balls", "dog", "dogs", "bear",
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray", "street",
    "park", "room", "garden", "forest", "background", "chasing", "lying", "sitting", "next",
)
TINY_UMT5_PIECES = (f"{SPIECE_SPACE}gir", "affe", f"{SPIECE_SPACE}hedge", "hog", f"{SPIECE_SPACE}pen", "guin")
_ASCII_CHARS = "".join(chr(c) for c in range(33, 127))


def _config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    """A fresh, mutable dict of an embedded config (tuples become lists: diffusers concatenates some as lists)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}


def build_tiny_umt5_tokenizer() -> T5TokenizerFast:
    """A small `T5TokenizerFast` with umT5's structure: a sentencepiece unigram model with ``<pad>`` = 0,
    ``</s>`` = 1, ``<unk>`` = 2, NFKC and collapsed spaces, word-start marker ``▁`` prepended to every word,
    ``</s>`` appended, no BOS. Built from a vocabulary list, offline."""
    pieces: dict[str, float] = {}
    for word in TINY_UMT5_WORDS:
        pieces.setdefault(SPIECE_SPACE + word, -3.0)
    for piece in TINY_UMT5_PIECES:
        pieces.setdefault(piece, -4.0)
    for char in _ASCII_CHARS:
        pieces.setdefault(SPIECE_SPACE + char, -9.0)
        pieces.setdefault(char, -8.0)
    pieces.setdefault(SPIECE_SPACE, -10.0)
    vocab = [(PAD_TOKEN, 0.0), (EOS_TOKEN, 0.0), (UNK_TOKEN, 0.0)] + list(pieces.items())
    backend = Tokenizer(tokenizer_models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="always", split=True)])
    backend.decoder = decoders.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}", special_tokens=[(EOS_TOKEN, 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN, pad_token=PAD_TOKEN,
                           extra_ids=0, model_max_length=WAN_TEXT_TOKENS)


def load_wan_tokenizer(folder: str | os.PathLike) -> T5TokenizerFast:
    """The umT5 tokenizer saved in ``folder`` (a model's ``tokenizer/``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingWeightsError(f"tokenizer folder {folder} does not exist")
    return T5TokenizerFast.from_pretrained(str(folder))


# --------------------------------------------------------------------------------------------
# Text: encoding and token positions


def clean_prompt(prompt: str) -> str:
    """The text the encoder sees: WanPipeline's ``prompt_clean`` (ftfy when installed, HTML unescape,
    whitespace collapsed and stripped)."""
    return prompt_clean(prompt)


def encode_wan_prompts(tokenizer, text_encoder, prompts: Sequence[str], device: torch.device,
                       dtype: torch.dtype, max_tokens: int = WAN_TEXT_TOKENS) -> torch.Tensor:
    """Prompts -> (n, 512, D) umT5 embeddings, as `WanPipeline` encodes them: cleaned, padded / truncated to
    ``max_tokens`` with the attention mask, the states past each prompt's own tokens set to zero."""
    texts = [clean_prompt(prompt) for prompt in prompts]
    inputs = tokenizer(texts, padding="max_length", max_length=max_tokens, truncation=True, add_special_tokens=True,
                       return_attention_mask=True, return_tensors="pt")
    lengths = inputs.attention_mask.gt(0).sum(dim=1).long()
    encoder_device = next(text_encoder.parameters()).device
    with torch.no_grad():
        states = text_encoder(inputs.input_ids.to(encoder_device),
                              inputs.attention_mask.to(encoder_device)).last_hidden_state
    states = states.to(dtype=dtype, device=device)
    return torch.stack([torch.cat([row[:length], row.new_zeros(max_tokens - length, row.size(1))])
                        for row, length in zip(states, lengths)])


def _find_word(phrase: str, text: str) -> re.Match | None:
    """The first word-boundary match of ``phrase`` in ``text`` (the same test `utils.layout.refine_phrase` uses:
    the phrase as a pattern, or literally where it is not a valid pattern)."""
    try:
        return re.search(rf"\b{phrase}\b", text)
    except re.error:
        return re.search(rf"\b{re.escape(phrase)}\b", text)


def compute_wan_token_positions(text: str, phrases: Sequence[str], tokenizer, max_tokens: int = WAN_TEXT_TOKENS
                                ) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """umT5 token positions of every phrase in ``text`` (the cleaned prompt the encoder sees), and its tokens.

    Each phrase is refined against the text as for the UNets (as given, stripped, last word, its plural; spec
    3.2), located at the first word-boundary match of the refined phrase, and mapped to every token whose
    character span overlaps the match (all pieces of a multi-piece word; no BOS, so position 0 is the first
    piece). Raises `utils.layout.LayoutValidationError` naming the prompt and phrase when it is not found, has
    no tokens, or lies past the ``max_tokens`` the encoder keeps.
    """
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    token_map = tuple(tokenizer.convert_ids_to_tokens(encoding["input_ids"]))
    offsets = encoding["offset_mapping"]
    positions = []
    for phrase in phrases:
        refined = refine_phrase(phrase, text)
        match = _find_word(refined, text) if refined else None
        if match is None or match.end() == match.start():
            raise LayoutValidationError(f"phrase {phrase!r} does not occur in the prompt {text!r} as a word "
                                        "(nor its last word or that word's plural)", prompt=text)
        start, end = match.span()
        span = tuple(index for index, (left, right) in enumerate(offsets)
                     if right > left and left < end and right > start)
        if not span:
            raise LayoutValidationError(f"phrase {phrase!r} (matched as {refined!r}) covers no token of the prompt "
                                        f"{text!r}", prompt=text)
        if span[-1] >= max_tokens:
            raise LayoutValidationError(f"phrase {phrase!r} sits at token positions {list(span)}, past the "
                                        f"{max_tokens} tokens the text encoder keeps; shorten the prompt", prompt=text)
        positions.append(span)
    return tuple(positions), token_map


# --------------------------------------------------------------------------------------------
# The model


def build_wan_scheduler(config: Mapping[str, Any] | None = None, corrector_off_steps: int = 0
                        ) -> UniPCMultistepScheduler:
    """UniPC from a Wan scheduler config (default `WAN_SCHEDULER_CONFIG`), with its corrector switched off on
    the first ``corrector_off_steps`` steps.

    UniPC's corrector at step i rebuilds x_i from x_{i-1} and the new model output, so most of an edit made to
    x_i before step i (LVD's guidance) is undone; with the corrector off there, x_i is used as it is. Step i's
    corrector is keyed by i - 1 in UniPC's ``disable_corrector`` (step 0 has none), hence ``range(K - 1)``.
    0 is the stock sampler (`WanPipeline`).
    """
    if corrector_off_steps < 0:
        raise ValueError(f"corrector_off_steps must be >= 0, got {corrector_off_steps}")
    base = _config_dict(WAN_SCHEDULER_CONFIG if config is None else config)
    base["disable_corrector"] = list(range(max(corrector_off_steps - 1, 0)))
    return UniPCMultistepScheduler.from_config(base)


def corrector_off_steps_of(scheduler) -> int:
    """The ``corrector_off_steps`` a scheduler was built with (inverse of `build_wan_scheduler`)."""
    disabled = sorted(getattr(scheduler.config, "disable_corrector", None) or [])
    if not disabled:
        return 0
    if disabled != list(range(len(disabled))):
        raise ValueError(f"the scheduler disables the corrector on steps {disabled}, not on the first steps")
    return len(disabled) + 1


@dataclasses.dataclass(frozen=True)
class WanVideoModel:
    """The components of a Wan 2.1 T2V model, frozen, in eval mode.

    ``dtype`` is the transformer's (and text encoder's) compute dtype; ``vae_dtype`` the VAE's (fp32 by default:
    diffusers recommends it for Wan). Latents stay float32 between steps, as in `WanPipeline`. With
    ``offload_text_encoder`` the text encoder lives on the CPU and visits ``device`` only to encode.
    ``text_encoder`` may be None (random-weight benchmarks pass text embeddings themselves).
    """

    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan | None
    text_encoder: UMT5EncoderModel | None
    tokenizer: T5TokenizerFast
    scheduler: UniPCMultistepScheduler
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    spec: RunModelSpec | None
    source: str
    offload_text_encoder: bool = False

    def make_scheduler(self) -> UniPCMultistepScheduler:
        """A fresh scheduler with this model's config (UniPC keeps solver state between steps)."""
        return UniPCMultistepScheduler.from_config(self.scheduler.config)

    @property
    def corrector_off_steps(self) -> int:
        return corrector_off_steps_of(self.scheduler)

    def with_corrector_off_steps(self, steps: int) -> "WanVideoModel":
        """The same model sampling with UniPC's corrector off on the first ``steps`` steps (see
        `build_wan_scheduler`; 0: the stock sampler)."""
        return dataclasses.replace(self, scheduler=build_wan_scheduler(self.scheduler.config, steps))

    def with_text_encoder_offload(self, offload: bool = True) -> "WanVideoModel":
        """The same model with the text encoder kept on the CPU between encodings (or back on ``device``)."""
        if self.text_encoder is not None:
            self.text_encoder.to("cpu" if offload else self.device)
        return dataclasses.replace(self, offload_text_encoder=offload)

    @contextlib.contextmanager
    def text_encoder_on_device(self) -> Iterator[UMT5EncoderModel]:
        """The text encoder on ``device`` for the duration (moved back to the CPU afterwards when offloaded; a
        nested use inside another leaves the move to the outer one)."""
        if self.text_encoder is None:
            raise ValueError(f"{self.source}: this Wan model was built without a text encoder; pass text "
                             "embeddings instead of prompts")
        if not self.offload_text_encoder or next(self.text_encoder.parameters()).device == self.device:
            yield self.text_encoder
            return
        self.text_encoder.to(self.device)
        try:
            yield self.text_encoder
        finally:
            self.text_encoder.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(n, 512, D) text embeddings of ``prompts`` in the transformer's dtype (see `encode_wan_prompts`)."""
        with self.text_encoder_on_device() as text_encoder:
            states = encode_wan_prompts(self.tokenizer, text_encoder, prompts, self.device, text_encoder.dtype)
        return states.to(self.dtype)


def cast_wan_transformer(transformer: WanTransformer3DModel, dtype: torch.dtype) -> WanTransformer3DModel:
    """Cast to ``dtype`` except the modules diffusers keeps in float32 when loading Wan in half precision
    (``_keep_in_fp32_modules``: rope, time embedder, modulation tables, norms), as `from_pretrained` does."""
    keep = tuple(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, tensor in [*transformer.named_parameters(), *transformer.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            target = torch.float32 if any(part in keep for part in name.split(".")) else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)
    return transformer


def assemble_wan_model(components: dict[str, Any], device: torch.device, dtype: torch.dtype,
                       vae_dtype: torch.dtype, spec: RunModelSpec | None, source: str, *,
                       offload_text_encoder: bool = False, corrector_off_steps: int = 0) -> WanVideoModel:
    """A `WanVideoModel` from built or loaded components: moved, frozen, in eval mode (dtypes as loaded)."""
    for name in ("transformer", "vae", "text_encoder"):
        module = components.get(name)
        if module is None:
            continue
        module.eval()
        module.requires_grad_(False)
        module.to("cpu" if name == "text_encoder" and offload_text_encoder else device)
    scheduler = build_wan_scheduler(components["scheduler"].config, corrector_off_steps)
    return WanVideoModel(transformer=components["transformer"], vae=components.get("vae"),
                         text_encoder=components.get("text_encoder"), tokenizer=components["tokenizer"],
                         scheduler=scheduler, device=device, dtype=dtype, vae_dtype=vae_dtype, spec=spec,
                         source=source, offload_text_encoder=offload_text_encoder)


def build_tiny_wan_components(seed: int = 0) -> dict[str, Any]:
    """Tiny fp32 CPU components (transformer, vae, text_encoder, tokenizer, scheduler); same seed, same weights."""
    tokenizer = build_tiny_umt5_tokenizer()
    umt5_config = UMT5Config(**{**WAN_UMT5_CONFIG, **TINY_UMT5_OVERRIDES, "vocab_size": len(tokenizer)})
    return {
        "transformer": build_seeded(seed + _SEED_OFFSETS["transformer"],
                                    lambda: WanTransformer3DModel.from_config(_config_dict(TINY_WAN_TRANSFORMER_CONFIG))),
        "vae": build_seeded(seed + _SEED_OFFSETS["vae"], lambda: AutoencoderKLWan.from_config(_config_dict(TINY_WAN_VAE_CONFIG))),
        "text_encoder": build_seeded(seed + _SEED_OFFSETS["text_encoder"], lambda: UMT5EncoderModel(umt5_config)),
        "tokenizer": tokenizer,
        "scheduler": build_wan_scheduler(),
    }


def build_tiny_wan_model(seed: int = 0, device: str | torch.device | None = "cpu",
                         dtype: str | torch.dtype | None = None, spec: RunModelSpec | None = None, *,
                         corrector_off_steps: int = 0) -> WanVideoModel:
    """A tiny random-weight `WanVideoModel` (default: CPU, fp32; ``spec`` defaults to `lvd_wan_tiny`)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    components = build_tiny_wan_components(seed)
    cast_wan_transformer(components["transformer"], dtype)
    if dtype != torch.float32:
        components["text_encoder"].to(dtype)
    return assemble_wan_model(components, device, dtype, torch.float32,
                              spec if spec is not None else get_run_model("lvd_wan_tiny"),
                              f"tiny random Wan weights (seed {seed})", corrector_off_steps=corrector_off_steps)


def save_tiny_wan_model(folder: str | os.PathLike, seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write the tiny Wan model as a hub-like folder (transformer/, vae/, text_encoder/, tokenizer/,
    scheduler/, model_index.json) that `load_video_model(spec, model_path=folder)` loads (written aside, then
    renamed into place)."""
    components = build_tiny_wan_components(seed)
    with atomic_folder(folder, overwrite=overwrite) as staging:
        for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            components[name].save_pretrained(str(staging / name))
        atomic_write_json(staging / "model_index.json", dict(TINY_WAN_MODEL_INDEX))
    return Path(folder)




def resolve_wan_model_folder(spec: RunModelSpec, model_path: str | os.PathLike | None = None, *,
                             local_files_only: bool = False, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of ``spec``'s Wan weights (`models.hub.resolve_model_folder`: a clear, fast error)."""
    return find_model_folder(spec, model_path, local_files_only=local_files_only, cache_dir=cache_dir)


def load_wan_components_from_folder(folder: Path, dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, Any]:
    """Load the five components from a hub-like folder (no network), dtypes as `WanPipeline.from_pretrained`
    gives them (the transformer keeps its float32 modules)."""
    try:
        transformer = WanTransformer3DModel.from_pretrained(str(folder), subfolder="transformer", dtype=dtype,
                                                            local_files_only=True)
        vae = AutoencoderKLWan.from_pretrained(str(folder), subfolder="vae", dtype=vae_dtype, local_files_only=True)
        text_encoder = UMT5EncoderModel.from_pretrained(str(folder / "text_encoder"), dtype=dtype,
                                                        local_files_only=True)
    except OSError as exc:  # diffusers / transformers raise OSError (EnvironmentError) for missing files
        raise MissingWeightsError(f"could not load Wan weights from {folder}: {exc}") from exc
    scheduler = UniPCMultistepScheduler.from_pretrained(str(folder), subfolder="scheduler")
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder,
            "tokenizer": load_wan_tokenizer(folder / "tokenizer"), "scheduler": scheduler}


def wan_transformer_config(size: str = "1.3b") -> dict[str, Any]:
    """The full-size transformer config of Wan 2.1 T2V ``"1.3b"`` or ``"14b"``."""
    if size not in ("1.3b", "14b"):
        raise ValueError(f"Wan 2.1 T2V comes in '1.3b' and '14b', got {size!r}")
    return _config_dict({**WAN_1_3B_TRANSFORMER_CONFIG, **(WAN_14B_TRANSFORMER_OVERRIDES if size == "14b" else {})})


def build_random_wan_model(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, *,
                           size: str = "1.3b", seed: int = 0, with_vae: bool = True, spec: RunModelSpec | None = None,
                           tokenizer=None, transformer_overrides: Mapping[str, Any] | None = None) -> WanVideoModel:
    """A full-size random-weight Wan model (transformer and, with ``with_vae``, the VAE) for benchmarks: no text
    encoder (5.7B parameters; benchmarks pass text embeddings). Built directly on ``device``; ``"meta"`` builds the
    architecture without memory (FLOP and activation counts). The transformer keeps diffusers' float32 modules.
    ``transformer_overrides`` change its config (e.g. fewer blocks for a quick count)."""
    device = torch.device(device) if str(device) == "meta" else resolve_device(device)
    dtype = resolve_dtype(dtype if dtype is not None else ("bf16" if device.type == "cuda" else None),
                          device if device.type != "meta" else "cpu")
    config = {**wan_transformer_config(size), **(transformer_overrides or {})}

    def build_here(build):
        def build_on_device():
            with torch.device(device):
                return build()
        return build_on_device

    transformer = build_seeded(seed + _SEED_OFFSETS["transformer"],
                               build_here(lambda: WanTransformer3DModel.from_config(config)),
                               device if device.type == "cuda" else None)
    cast_wan_transformer(transformer, dtype)
    vae = None
    if with_vae:
        vae = build_seeded(seed + _SEED_OFFSETS["vae"], build_here(lambda: AutoencoderKLWan.from_config(
            _config_dict(WAN_VAE_CONFIG))), device if device.type == "cuda" else None)
    components = {"transformer": transformer, "vae": vae, "text_encoder": None,
                  "tokenizer": tokenizer if tokenizer is not None else build_tiny_umt5_tokenizer(),
                  "scheduler": build_wan_scheduler()}
    return assemble_wan_model(components, device, dtype, torch.float32, spec,
                              f"random Wan 2.1 {size} weights (seed {seed}), no text encoder")


# --------------------------------------------------------------------------------------------
# Latents and decoding


def wan_latent_num_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """Latent frames of a ``num_frames`` video: frame 0 alone, then one per group of ``temporal_factor``."""
    return (num_frames - 1) // temporal_factor + 1


def decode_wan_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> np.ndarray:
    """(1, 16, latent frames, h, w) latents -> (F, H, W, 3) float32 frames in [0, 1], as `WanPipeline` decodes
    (``latents / (1 / std) + mean``, one VAE call, then its video processor)."""
    latents = latents.to(next(vae.parameters()).device, dtype=vae.dtype)
    z_dim = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device,
                                                                                         latents.dtype)
    with torch.no_grad():
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
    processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)
    return processor.postprocess_video(video, output_type="np")[0]
