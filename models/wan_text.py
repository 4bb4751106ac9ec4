"""Wan's text side: the umT5 tokenizer (the tiny one built offline from a word list, or a saved one), prompt
encoding as `WanPipeline` does it, and the token positions of object phrases in a prompt."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from tokenizers import Regex, Tokenizer, decoders, models as tokenizer_models, normalizers, pre_tokenizers, processors
from transformers import T5TokenizerFast

from models.hub import MissingWeightsError
from models.wan_configs import WAN_TEXT_TOKENS
from utils.layout import LayoutValidationError, refine_phrase

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


def build_tiny_umt5_tokenizer(words: Sequence[str] = TINY_UMT5_WORDS,
                              word_pieces: Sequence[str] = TINY_UMT5_PIECES) -> T5TokenizerFast:
    """A small `T5TokenizerFast` with umT5's structure: a sentencepiece unigram model with ``<pad>`` = 0,
    ``</s>`` = 1, ``<unk>`` = 2, NFKC and collapsed spaces, word-start marker ``▁`` prepended to every word,
    ``</s>`` appended, no BOS. Built offline from ``words`` (one piece each) and ``word_pieces``."""
    pieces: dict[str, float] = {}
    for word in words:
        pieces.setdefault(SPIECE_SPACE + word, -3.0)
    for piece in word_pieces:
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
                       dtype: torch.dtype, max_tokens: int = WAN_TEXT_TOKENS, *, grad: bool = False) -> torch.Tensor:
    """Prompts -> (n, 512, D) umT5 embeddings, as `WanPipeline` encodes them: cleaned, padded / truncated to
    ``max_tokens`` with the attention mask, the states past each prompt's own tokens set to zero (``grad``: with
    the encoder's graph, for training)."""
    texts = [clean_prompt(prompt) for prompt in prompts]
    inputs = tokenizer(texts, padding="max_length", max_length=max_tokens, truncation=True, add_special_tokens=True,
                       return_attention_mask=True, return_tensors="pt")
    lengths = inputs.attention_mask.gt(0).sum(dim=1).long()
    encoder_device = next(text_encoder.parameters()).device
    with contextlib.nullcontext() if grad else torch.no_grad():
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
