"""The stage-1 layout cache: LLM replies per prompt, in the published LVD format.

On disk (``LVD-CACHE-FORMAT.md``): one JSON object mapping a prompt to the list of its reply
strings, written as ``json.dump(obj, f, indent=4)`` (ASCII-escaped, no trailing newline, keys in
insertion order). The published caches load and re-serialise byte-identically.

Reads are by (prompt, occurrence): the k-th time a prompt occurs in a prompt list it reads reply k
(:func:`occurrence_indices`). That is what the reference's per-key cursors give for a full pass,
but unlike them it also holds for a shard of the list (``--skip_first_prompts``/``--num_prompts``,
spec 15.3), and needs no cursor state.

Writes append. Each append takes an exclusive ``flock`` on a lock file next to the cache
(``.<name>.lock``), re-reads the file, appends and rewrites it atomically (temp file + rename), so
two processes adding to one file lose nothing and a crash mid-write leaves the old file intact.
:meth:`LayoutCache.store` appends the reply of one (prompt, occurrence) only if that occurrence has
no reply yet, so two runs of the same shard into one cache store each reply once.
Replies are stored as received: the reference stored a reconstruction that truncated some
background keywords (spec 2.3); the text as received parses to the same layout.

File names: ``cache_<prompt type without "lmd_">_<template version>_<model>.json``. A "/" in a
model name (``Qwen/Qwen2.5-7B-Instruct``, as vLLM names models) becomes ``__``.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from utils.io import atomic_write_text

DEFAULT_CACHE_DIR = Path("cache")
JSON_INDENT = 4  # the published format

logger = logging.getLogger(__name__)


# Where the authors' published caches are (LVD release): named by every "no cache" message. The demo cache
# (the README's stage-2 examples, --prompt-type demo --model gpt-4-1106-preview) is published with them.
PUBLISHED_CACHE_FILES = ("cache_lvd_v0.1_gpt-4-1106-preview.json", "cache_lvd_v0.1_gpt-3.5-turbo.json",
                         "cache_demo_v0.1_gpt-4-1106-preview.json")
PUBLISHED_CACHE_SOURCE = "the cache/ folder of github.com/TonyLianLong/LLM-groundedVideoDiffusion"
# The hand-written demo cache shipped in cache/ (no download, no API key).
SHIPPED_DEMO_CACHE = "cache_demo_v0.1_handwritten.json"


class CacheFormatError(ValueError):
    """A cache file is not a JSON object of prompt -> list of reply strings."""


def describe_missing_cache(path: str | os.PathLike, flag: str = "--cache-dir", *, how_to_make: bool = True) -> str:
    """One line for a cache file that does not exist: the path, the flag to point elsewhere, and what to get:
    the published cache of that name, else where the published caches and the shipped demo cache are and
    (``how_to_make``) how to make one."""
    name = Path(path).name
    if name in PUBLISHED_CACHE_FILES:
        where = "--cache-path FILE" if flag == "--cache-path" else "--cache-dir DIR (its folder)"
        return (f"no layout cache at {path} ({flag}); {name} is one of the authors' published caches, in "
                f"{PUBLISHED_CACHE_SOURCE}: download it and pass {where}, or copy it into cache/")
    text = (f"no layout cache at {path} ({flag}); the authors' published caches ({', '.join(PUBLISHED_CACHE_FILES)}) "
            f"are in {PUBLISHED_CACHE_SOURCE}: download them and pass --cache-dir DIR, or copy them into cache/; "
            f"the shipped demo cache is cache/{SHIPPED_DEMO_CACHE} (--prompt-type demo --model handwritten)")
    return text + ("; to make a cache of your own, run prompt_batch.py --auto-query" if how_to_make else "")


def sanitize_model_name(model: str) -> str:
    """A model name made safe for a file name: "/" becomes "__" (no other change)."""
    return model.replace("/", "__")


def cache_file_name(prompt_type: str, template_version: str, model: str) -> str:
    return f"cache_{prompt_type.replace('lmd_', '')}_{template_version}_{sanitize_model_name(model)}.json"


def cache_path(prompt_type: str, template_version: str, model: str,
               cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR) -> Path:
    """``<cache_dir>/cache_<type>_<version>_<model>.json`` (spec 1.3); ``model`` is the full name."""
    return Path(cache_dir) / cache_file_name(prompt_type, template_version, model)


def occurrence_indices(prompts: Sequence[str]) -> list[int]:
    """For each position, how many times its prompt occurred before: ["a", "b", "a"] -> [0, 0, 1]."""
    seen: dict[str, int] = {}
    indices = []
    for prompt in prompts:
        indices.append(seen.get(prompt, 0))
        seen[prompt] = indices[-1] + 1
    return indices


def select_window(num_items: int, skip_first: int = 0, num: int | None = None, *, passes: int = 1) -> range:
    """The indices ``[skip_first, skip_first + num)`` of a list of ``num_items`` (a shard), clipped to the list.

    With ``passes`` > 1 the list is repeated that many times (``generate.py --regenerate``): index ``i``
    is position ``i % num_items`` of pass ``i // num_items``, so ``divmod(i, num_items)`` gives both.
    This is the only windowing rule of the project: every CLI shards with it.
    """
    if skip_first < 0 or (num is not None and num < 0):
        raise ValueError(f"skip_first_prompts and num_prompts must be >= 0, found {skip_first} and {num}")
    if num_items < 0 or passes < 1:
        raise ValueError(f"num_items must be >= 0 and passes >= 1, found {num_items} and {passes}")
    total = num_items * passes
    stop = total if num is None else min(total, skip_first + num)
    return range(min(skip_first, total), stop)


def serialize_cache(entries: dict[str, list[str]]) -> str:
    """The published on-disk text of a cache."""
    return json.dumps(entries, indent=JSON_INDENT)


def parse_cache(text: str, source: str = "<string>") -> dict[str, list[str]]:
    """Cache text -> dict, checking the shape (raises :class:`CacheFormatError`)."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise CacheFormatError(f"{source}: not valid JSON ({error})") from None
    if not isinstance(entries, dict):
        raise CacheFormatError(f"{source}: expected a JSON object of prompt -> list of replies, "
                               f"found {type(entries).__name__}")
    for prompt, replies in entries.items():
        if not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
            raise CacheFormatError(f"{source}: the value of prompt {prompt!r} must be a list of strings, "
                                   f"found {json.dumps(replies)[:120]}")
    return entries


def load_cache_entries(path: str | os.PathLike) -> dict[str, list[str]]:
    """The entries of a cache file; an absent file is an empty cache.

    Raises :class:`CacheFormatError`, naming the file, for a file that is empty, not UTF-8, not JSON
    or not shaped as a cache, and for a folder in its place.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise CacheFormatError(f"{path}: is a folder, not a cache file") from None
    except UnicodeDecodeError as error:
        raise CacheFormatError(f"{path}: not a text (UTF-8) file ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise CacheFormatError(f"{path}: the file is empty; a cache holds a JSON object of prompt -> list of "
                               "replies (delete the file to start a new cache)")
    return parse_cache(text, str(path))


def lock_path_for(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock for ``path`` (released on exit, or when the process dies).

    Every writer of ``path`` writes under this lock, so on entry any temp file of an atomic write of
    ``path`` (``.<stem>.<random>.tmp<suffix>``) is left by a killed writer: it is removed. The lock file
    ``.<name>.lock`` is removed on exit too; a process that locked a lock file another one then removed
    sees that it no longer is the file at the path and locks again, so two holders never overlap.
    """
    lock_path = lock_path_for(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                current = os.stat(lock_path)
            except FileNotFoundError:
                current = None
            if current is not None and current.st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except BaseException:
            handle.close()
            raise
        handle.close()  # the file this process locked was removed meanwhile: lock the new one
    try:
        remove_stale_temp_files_of(path)
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()  # closing releases the lock, after the unlink


def remove_stale_temp_files_of(path: str | os.PathLike) -> int:
    """Delete the temp files of interrupted atomic writes of ``path``; returns how many. Call it under
    :func:`locked` (``path``), when no writer of ``path`` can be mid-write."""
    path = Path(path)
    removed = 0
    for temp in path.parent.glob(f".{glob.escape(path.stem)}.*.tmp{glob.escape(path.suffix)}"):
        try:
            temp.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as error:  # a read-only folder: nothing was written there either
            logger.debug("cannot remove %s: %s", temp, error)
    return removed


def recover_interrupted_writes(path: str | os.PathLike) -> None:
    """On start: remove what a killed writer of ``path`` left (its temp files), under ``path``'s lock.
    A folder that cannot be written is left alone (nothing was written there either)."""
    try:
        with locked(path):
            pass
    except OSError as error:
        logger.debug("cannot lock %s to clean up interrupted writes: %s", path, error)


class LayoutCache:
    """A cache file and its entries. ``entries`` is the state at the last load or append."""

    def __init__(self, path: str | os.PathLike, entries: dict[str, list[str]] | None = None):
        self.path = Path(path)
        self.entries: dict[str, list[str]] = {} if entries is None else entries

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LayoutCache":
        return cls(path, load_cache_entries(path))

    def reload(self) -> None:
        self.entries = load_cache_entries(self.path)

    def get(self, prompt: str, occurrence: int = 0) -> str | None:
        """Reply ``occurrence`` of ``prompt``, or None (a miss)."""
        replies = self.entries.get(prompt, ())
        return replies[occurrence] if 0 <= occurrence < len(replies) else None

    def num_replies(self, prompt: str) -> int:
        return len(self.entries.get(prompt, ()))

    def __len__(self) -> int:
        """The number of replies (not keys)."""
        return sum(len(replies) for replies in self.entries.values())

    def store(self, prompt: str, occurrence: int, reply: str) -> tuple[int, bool]:
        """Save ``reply`` as reply ``occurrence`` of ``prompt`` unless that occurrence already has one.

        Returns ``(index, added)``: where the reply of that occurrence now is, and whether this call
        added it. Under the lock the file is re-read first, so a reply another process stored for the
        same occurrence meanwhile wins and nothing is stored twice (the same shard run twice at once).
        When earlier occurrences have no reply yet (a shard that starts mid-repeat) the reply is
        appended all the same, at the first free index, as the published format has no gaps.
        """
        if not isinstance(prompt, str) or not isinstance(reply, str):
            raise TypeError(f"cache items must be (str, str), found ({type(prompt).__name__}, "
                            f"{type(reply).__name__})")
        if occurrence < 0:
            raise ValueError(f"occurrence must be >= 0, found {occurrence}")
        with locked(self.path):
            entries = load_cache_entries(self.path)
            replies = entries.setdefault(prompt, [])
            if occurrence < len(replies):
                self.entries = entries
                return occurrence, False
            replies.append(reply)
            atomic_write_text(self.path, serialize_cache(entries))
        self.entries = entries
        return len(replies) - 1, True

    def append(self, prompt: str, reply: str) -> int:
        """Add a reply for ``prompt`` and save; returns its occurrence index.

        Under the lock the file is re-read first, so replies other processes added meanwhile are
        kept (and show up in ``entries``).
        """
        return self.extend([(prompt, reply)])[0]

    def extend(self, items: Iterable[tuple[str, str]]) -> list[int]:
        """Add several (prompt, reply) pairs with one locked rewrite; returns their occurrence indices."""
        items = list(items)
        for prompt, reply in items:
            if not isinstance(prompt, str) or not isinstance(reply, str):
                raise TypeError(f"cache items must be (str, str), found ({type(prompt).__name__}, "
                                f"{type(reply).__name__})")
        if not items:
            return []
        with locked(self.path):
            entries = load_cache_entries(self.path)
            indices = []
            for prompt, reply in items:
                replies = entries.setdefault(prompt, [])
                replies.append(reply)
                indices.append(len(replies) - 1)
            atomic_write_text(self.path, serialize_cache(entries))
        self.entries = entries
        return indices
