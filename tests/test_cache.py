"""The layout cache: published format, occurrence reads, locked appends, atomic rewrites."""
from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
from pathlib import Path

import pytest

from utils.cache import (CacheFormatError, LayoutCache, cache_path, load_cache_entries, lock_path_for,
                         occurrence_indices, parse_cache, sanitize_model_name, select_window, serialize_cache)

PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "lvd-caches"
PUBLISHED_FILES = sorted(PUBLISHED.glob("cache_*.json")) if PUBLISHED.is_dir() else []


def test_occurrence_indices_count_earlier_repeats():
    assert occurrence_indices(["a", "b", "a", "a", "c", "b"]) == [0, 0, 1, 2, 0, 1]
    assert occurrence_indices([]) == []


def test_select_window_is_a_clipped_shard():
    assert select_window(10) == range(0, 10)
    assert select_window(10, 3, 4) == range(3, 7)
    assert select_window(10, 8, 5) == range(8, 10)
    assert select_window(10, 12) == range(10, 10)
    with pytest.raises(ValueError, match=">= 0"):
        select_window(10, -1)


def test_select_window_over_regenerate_passes():
    # generate.py --regenerate 3 over a 4-prompt list: indices run over the repeated list.
    window = select_window(4, 2, 7, passes=3)
    assert window == range(2, 9)
    assert [divmod(i, 4) for i in window] == [(0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    assert select_window(4, passes=3) == range(12) and select_window(4, 10, None, passes=2) == range(8, 8)
    assert select_window(0, 0, 5, passes=2) == range(0, 0)
    with pytest.raises(ValueError, match="passes"):
        select_window(4, passes=0)


def test_cache_path_follows_the_reference_naming(tmp_path):
    assert cache_path("lvd", "v0.1", "gpt-4-1106-preview") == Path("cache/cache_lvd_v0.1_gpt-4-1106-preview.json")
    assert cache_path("lmd_demo", "v0.1", "gpt-3.5-turbo", tmp_path).name == "cache_demo_v0.1_gpt-3.5-turbo.json"
    assert sanitize_model_name("Qwen/Qwen2.5-7B-Instruct") == "Qwen__Qwen2.5-7B-Instruct"
    assert cache_path("lvd", "v0.1", "org/model").name == "cache_lvd_v0.1_org__model.json"


def test_appends_write_the_published_format(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    cache = LayoutCache.load(path)
    assert cache.entries == {} and cache.get("p") is None
    assert cache.append("b prompt", "reply 1") == 0
    assert cache.append("a caf\u00e9 prompt", "r\u00e9ply \u2192") == 0
    assert cache.append("b prompt", "reply 2") == 1
    raw = path.read_bytes()
    expected = {"b prompt": ["reply 1", "reply 2"], "a caf\u00e9 prompt": ["r\u00e9ply \u2192"]}
    assert raw == json.dumps(expected, indent=4).encode("ascii")  # insertion order, ASCII escapes
    assert not raw.endswith(b"\n") and b"\\u00e9" in raw
    assert list(json.loads(raw)) == ["b prompt", "a caf\u00e9 prompt"]
    again = LayoutCache.load(path)
    assert again.get("b prompt", 0) == "reply 1" and again.get("b prompt", 1) == "reply 2"
    assert again.get("b prompt", 2) is None and again.get("b prompt", -1) is None
    assert len(again) == 3 and again.num_replies("b prompt") == 2


def test_replies_are_stored_as_received(tmp_path):
    # The reference cut the background to the length of the Frame 6 segment (spec 2.3); we must not.
    reply = "Reasoning: r.\n\nFrame 1: []\nFrame 2: []\nFrame 3: []\nFrame 4: []\nFrame 5: []\nFrame 6: []\n" \
            "Background keyword: street"
    cache = LayoutCache.load(tmp_path / "c.json")
    cache.append("p", reply)
    assert LayoutCache.load(tmp_path / "c.json").get("p") == reply


def test_extend_sees_what_another_writer_added(tmp_path):
    path = tmp_path / "c.json"
    first, second = LayoutCache.load(path), LayoutCache.load(path)
    first.append("p", "one")
    assert second.extend([("p", "two"), ("q", "three")]) == [1, 0]
    assert second.entries == {"p": ["one", "two"], "q": ["three"]}
    assert load_cache_entries(path) == second.entries
    with pytest.raises(TypeError, match="str"):
        second.extend([("p", None)])


def test_malformed_cache_files_raise_a_named_error(tmp_path):
    with pytest.raises(CacheFormatError, match="JSON object"):
        parse_cache("[1, 2]", "x.json")
    with pytest.raises(CacheFormatError, match="list of strings"):
        parse_cache('{"p": "not a list"}', "x.json")
    with pytest.raises(CacheFormatError, match="not valid JSON"):
        parse_cache("{", "x.json")
    (tmp_path / "bad.json").write_text('{"p": [1]}')
    with pytest.raises(CacheFormatError, match="bad.json"):
        LayoutCache.load(tmp_path / "bad.json")


@pytest.mark.parametrize("content,match", [
    (b"", "the file is empty"), (b"  \n", "the file is empty"), (b"\xff\xfe{}", "not a text \\(UTF-8\\) file"),
    (b"{", "not valid JSON"), (b"[]", "JSON object"), (b'{"p": [null]}', "list of strings"),
])
def test_broken_cache_files_raise_one_line_naming_the_file(tmp_path, content, match):
    path = tmp_path / "cache_x.json"
    path.write_bytes(content)
    with pytest.raises(CacheFormatError, match=match) as info:
        LayoutCache.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    folder = tmp_path / "cache_dir.json"
    folder.mkdir()
    with pytest.raises(CacheFormatError, match="is a folder"):
        LayoutCache.load(folder)


def test_store_adds_a_reply_once_per_occurrence(tmp_path):
    path = tmp_path / "c.json"
    first, second = LayoutCache.load(path), LayoutCache.load(path)
    assert first.store("p", 0, "one") == (0, True)
    assert second.store("p", 0, "one again") == (0, False)  # another writer filled occurrence 0 meanwhile
    assert second.get("p", 0) == "one"
    assert second.store("p", 1, "two") == (1, True)
    # A shard that starts mid-repeat on a cache without the earlier replies: the first free index.
    assert first.store("q", 3, "q-three") == (0, True)
    assert load_cache_entries(path) == {"p": ["one", "two"], "q": ["q-three"]}
    with pytest.raises(ValueError, match="occurrence"):
        first.store("p", -1, "x")


def _run_shard(path: str, barrier, replies: list[str]) -> None:
    cache = LayoutCache.load(path)
    barrier.wait(timeout=30)
    for occurrence, reply in enumerate(replies):
        cache.store("repeated prompt", occurrence, reply)
        cache.store(f"prompt {occurrence}", 0, reply)


def test_the_same_shard_run_twice_at_once_stores_each_reply_once(tmp_path):
    path = str(tmp_path / "c.json")
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_run_shard, args=(path, barrier, [f"{tag}{i}" for i in range(25)]), daemon=True)
               for tag in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    entries = load_cache_entries(path)
    assert len(entries["repeated prompt"]) == 25 and len(entries) == 26
    assert sum(len(replies) for replies in entries.values()) == 50  # not 100


def _append_many(path: str, tag: str, count: int) -> None:
    cache = LayoutCache.load(path)
    for i in range(count):
        cache.append("shared prompt", f"{tag}-{i}")
        cache.append(f"prompt of {tag}", f"{tag}-{i}")


def test_two_processes_appending_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "c.json")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(path, tag, 40)) for tag in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    entries = load_cache_entries(path)
    assert len(entries["shared prompt"]) == 80
    for tag in ("a", "b"):
        expected = [f"{tag}-{i}" for i in range(40)]
        assert entries[f"prompt of {tag}"] == expected
        assert [r for r in entries["shared prompt"] if r.startswith(tag)] == expected  # each writer's order kept
    assert not lock_path_for(path).exists()  # removed by its last holder (issue 17, item 14)


def _crash_while_writing(path: str) -> None:
    def half_write(self, data):
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
        os._exit(3)  # a hard crash: no cleanup, no exception handlers

    pathlib.Path.write_bytes = half_write
    LayoutCache.load(path).append("new prompt", "new reply")


def test_a_crash_mid_write_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "c.json"
    LayoutCache.load(path).append("old prompt", "old reply")
    before = path.read_bytes()
    worker = multiprocessing.get_context("fork").Process(target=_crash_while_writing, args=(str(path),))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 3
    assert path.read_bytes() == before
    # The dead process released its lock: a later append works and keeps the old entry.
    LayoutCache.load(path).append("later", "reply")
    assert load_cache_entries(path) == {"old prompt": ["old reply"], "later": ["reply"]}


@pytest.mark.skipif(not PUBLISHED_FILES, reason="needs the published caches in ../shared (absent in CI)")
@pytest.mark.parametrize("path", PUBLISHED_FILES, ids=lambda p: p.name)
def test_published_caches_reserialise_byte_identically(path, tmp_path):
    raw = path.read_bytes()
    cache = LayoutCache.load(path)
    assert serialize_cache(cache.entries).encode() == raw
    # An append round trip through the writer keeps every old byte in place.
    copy = LayoutCache(tmp_path / path.name, dict(cache.entries))
    copy.path.write_bytes(raw)
    copy.append("an extra prompt", "an extra reply")
    entries = load_cache_entries(copy.path)
    assert entries.pop("an extra prompt") == ["an extra reply"]
    assert serialize_cache(entries).encode() == raw


def test_temp_files_of_a_killed_write_and_the_lock_file_do_not_survive(tmp_path):
    # Issue 17, items 14 and 24: kill -9 inside a cache write left .c.<random>.tmp.json after the resume.
    path = tmp_path / "c.json"
    LayoutCache.load(path).append("old prompt", "old reply")
    worker = multiprocessing.get_context("fork").Process(target=_crash_while_writing, args=(str(path),))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 3 and len(list(tmp_path.glob(".c.*.tmp.json"))) == 1
    (tmp_path / ".other.x1.tmp.json").write_text("{}")  # another file's temp file is not this file's to remove
    from utils.cache import recover_interrupted_writes

    recover_interrupted_writes(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.x1.tmp.json", "c.json"]
