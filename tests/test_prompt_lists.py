"""Free-text prompt lists (prompt.resolve_prompts and friends): --prompts, --prompts-file, prompt type custom."""
from __future__ import annotations

import argparse

import pytest

from prompt import (ALL_PROMPT_TYPES, CUSTOM_PROMPT_TYPE, PromptListError, add_prompt_arguments, get_prompts,
                    prompts_from_args, read_prompts_file, resolve_prompts)
from utils.cache import cache_path


def test_a_prompt_type_gives_its_list():
    resolved = resolve_prompts("lvd_numeracy")
    assert resolved.prompt_type == "lvd_numeracy" and list(resolved.prompts) == get_prompts("lvd_numeracy")
    assert resolve_prompts(None).prompts == tuple(get_prompts("demo"))
    assert resolve_prompts(None, default_prompt_type="lvd").prompt_type == "lvd"
    with pytest.raises(PromptListError, match="unknown prompt type"):
        resolve_prompts("nope")


def test_free_text_is_prompt_type_custom_normalised_with_repeats():
    resolved = resolve_prompts(None, ["A cat jumps.", "  A dog runs  ", "A cat jumps"])
    assert resolved.prompt_type == CUSTOM_PROMPT_TYPE == "custom" and len(resolved) == 3
    assert resolved.prompts == ("A cat jumps", "A dog runs", "A cat jumps")
    assert resolve_prompts("custom", ["A cat"]).prompts == ("A cat",)
    assert cache_path(resolved.prompt_type, "v0.1", "gpt-4").name == "cache_custom_v0.1_gpt-4.json"
    assert CUSTOM_PROMPT_TYPE in ALL_PROMPT_TYPES


def test_a_prompts_file_skips_empty_and_comment_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\nA cat jumps onto a sofa.\n\n   \n  # indented comment\nA dog runs\nA dog runs\n")
    assert read_prompts_file(path) == ["A cat jumps onto a sofa", "A dog runs", "A dog runs"]
    resolved = resolve_prompts(None, prompts_file=path)
    assert resolved.prompt_type == "custom" and resolved.source == f"--prompts-file {path}"


@pytest.mark.parametrize("kwargs,match", [
    ({"prompts": []}, "no prompts given"),
    ({"prompts": ["A cat", "  ..  "]}, "prompt 2"),
    ({"prompt_type": "lvd", "prompts": ["A cat"]}, "drop --prompt-type lvd"),
    ({"prompt_type": "custom"}, "takes its prompts from --prompts"),
    ({"prompts": ["A cat"], "prompts_file": "x.txt"}, "not both"),
])
def test_bad_prompt_sources_are_clear_errors(kwargs, match):
    with pytest.raises(PromptListError, match=match):
        resolve_prompts(**kwargs)


@pytest.mark.parametrize("content,match", [
    (None, "cannot read it"), ("", "no prompts in it"), ("# only\n\n# comments\n", "no prompts in it"),
    ("A cat\n...\n", "line 2"), (b"\xff\xfe", "cannot read it"),
])
def test_bad_prompts_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "prompts.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(PromptListError, match=match) as info:
        read_prompts_file(path)
    assert str(path) in str(info.value)


def test_argparse_flags(capsys):
    parser = argparse.ArgumentParser()
    add_prompt_arguments(parser, default_prompt_type="lvd")
    assert prompts_from_args(parser.parse_args([]), default_prompt_type="lvd").prompt_type == "lvd"
    args = parser.parse_args(["--prompts", "A cat", "A dog"])
    assert prompts_from_args(args).prompts == ("A cat", "A dog")
    with pytest.raises(SystemExit):
        parser.parse_args(["--prompts", "A cat", "--prompts-file", "f.txt"])
    assert "not allowed with argument" in capsys.readouterr().err
