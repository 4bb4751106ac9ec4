"""The CLIP tokenizer of ModelScope / Zeroscope, built offline.

`build_clip_tokenizer` derives the standard CLIP BPE vocabulary from the merges file that the
`open-clip-torch` package ships, so tests and tiny models get the real token ids without the model
hub. `load_tokenizer` loads the tokenizer folder of a downloaded model.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import os
from pathlib import Path

from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

# Token limits of the CLIP text tower used by ModelScope / Zeroscope.
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
# 49408 = 256 bytes + 256 "</w>" variants + 48894 merges + 2 special tokens.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# ModelScope's special_tokens_map.json pads with "!" (id 0), the SD-2 convention, not with EOS.
PAD_TOKEN = "!"
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"


class TokenizerFilesError(FileNotFoundError):
    """The CLIP BPE merges file (shipped by open-clip-torch) cannot be found."""


def find_clip_bpe_file() -> Path:
    """Path of open_clip's ``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip.

    Importing open_clip would import torchvision, which this project must not depend on.
    """
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(Path(loc) / BPE_FILE_NAME) for loc in locations) or "no open_clip package installed"
    raise TokenizerFilesError(
        f"CLIP BPE vocabulary file {BPE_FILE_NAME!r} not found (tried: {tried}). "
        "Install it with `pip install --no-deps open-clip-torch` (--no-deps avoids torchvision)."
    )


def compute_bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte table: each of the 256 bytes maps to a printable unicode character.

    Printable latin-1 bytes map to themselves; the others are shifted to code points 256 and up.
    The iteration order (printable ranges first) fixes the first 256 vocabulary ids.
    """
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_values = list(printable)
    code_points = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + shift)
            shift += 1
    return {byte: chr(point) for byte, point in zip(byte_values, code_points)}


def build_clip_vocab_and_merges(bpe_path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP vocabulary (49408 tokens -> ids) and BPE merges (48894 pairs) from open_clip's gz file."""
    lines = gzip.decompress(Path(bpe_path).read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; only the first NUM_MERGES merges are used by CLIP.
    merge_lines = lines[1:NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in merge_lines]
    if len(merges) != NUM_MERGES or any(len(pair) != 2 for pair in merges):
        raise TokenizerFilesError(
            f"{bpe_path}: expected {NUM_MERGES} merge lines of two symbols each, "
            f"found {len(merges)} lines ({sum(len(p) != 2 for p in merges)} malformed)"
        )
    byte_chars = list(compute_bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise TokenizerFilesError(f"{bpe_path}: derived {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


@functools.lru_cache(maxsize=1)
def build_clip_tokenizer() -> CLIPTokenizer:
    """The ModelScope / Zeroscope CLIP tokenizer (pad "!" = 0, bos 49406, eos = unk 49407, 77 tokens).

    Cached: every call returns the same instance, so callers must not mutate it.
    """
    vocab, merges = build_clip_vocab_and_merges(find_clip_bpe_file())
    # transformers 5 ignores vocab_file/merges_file here; the vocabulary must be passed as data.
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges,
        bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
    return tokenizer


def load_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
    """Load the CLIP tokenizer saved in ``folder`` (a model's ``tokenizer/`` directory).

    Some saved configs lack ``model_max_length``; CLIP's 77-token limit is then set explicitly
    (otherwise padding to max length would pad to a huge default).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TokenizerFilesError(f"tokenizer folder {folder} does not exist")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    if tokenizer.model_max_length is None or tokenizer.model_max_length > MODEL_MAX_LENGTH:
        logger.debug("tokenizer in %s has model_max_length=%s; using %d", folder,
                     tokenizer.model_max_length, MODEL_MAX_LENGTH)
        tokenizer.model_max_length = MODEL_MAX_LENGTH
    return tokenizer
