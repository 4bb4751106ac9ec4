"""Stage 1 for the shapes benchmark without an LLM: the rule-based planner's layouts (shapes/planner.py) as a
published-format cache, which prompt_batch.py, generate.py and eval_stage_one.py read like an LLM's.

    python scripts/plan_shapes.py                    # writes cache/cache_shapes_v0.1_rule-based.json
    python scripts/plan_shapes.py --check            # exit 1 if the shipped cache differs from the planner
    python scripts/eval_stage_one.py --prompt-type shapes --model rule-based --template_version v0.1

The planner is deterministic (its choices are seeded by the caption and occurrence), so the cache is
reproduced byte for byte. ``--prompts`` plans free captions of the shapes grammar into the custom cache.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prompt import DEFAULT_TEMPLATE_VERSION, SHAPES_PROMPT_TYPE, resolve_prompts
from shapes.planner import PLANNER_NAME, CaptionParseError, build_planner_cache
from utils.cache import DEFAULT_CACHE_DIR, cache_path, serialize_cache
from utils.cli import OutputDirError, ensure_writable_dir, run_cli
from utils.io import atomic_write_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-type", default=SHAPES_PROMPT_TYPE, help="prompt set to plan (default: shapes)")
    parser.add_argument("--prompts", nargs="+", metavar="CAPTION", help="plan these captions instead (custom cache)")
    parser.add_argument("--template_version", default=DEFAULT_TEMPLATE_VERSION,
                        help="names the cache file (the planner uses no template)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where the cache is written")
    parser.add_argument("--check", action="store_true", help="compare with the cache on disk instead of writing it")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prompts = resolve_prompts(None if args.prompts else args.prompt_type, args.prompts)
        text = serialize_cache(build_planner_cache(list(prompts.prompts)))
        path = cache_path(prompts.prompt_type, args.template_version, PLANNER_NAME, args.cache_dir)
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            print(f"{path}: {'matches' if same else 'DIFFERS from'} the planner ({len(prompts)} prompts)")
            return 0 if same else 1
        ensure_writable_dir(Path(args.cache_dir), "--cache-dir")
    except (CaptionParseError, OutputDirError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    atomic_write_text(path, text)
    print(f"wrote {path} ({len(prompts)} prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
