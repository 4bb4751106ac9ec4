"""Stage-1 evaluation: score the cached LLM layouts of a benchmark with its checks (spec 10.1).

    python scripts/eval_stage_one.py --prompt-type lvd --template_version v0.1 --model gpt-4-1106-preview
    python scripts/eval_stage_one.py --prompt-type lvd --template_version v0.1 --model gpt-3.5-turbo \\
        --cache-path path/to/cache_lvd_v0.1_gpt-3.5-turbo.json --json-out eval_outputs/stage_one.json

Each benchmark entry reads the cached reply of its occurrence (the k-th time a prompt occurs it
reads reply k, also in a shard), builds the 6-frame condition with stripped phrases and applies
the entry's check. A miss is queried and saved like the reference does, but the LLM client is
built only then: a complete cache needs no API key. A miss that cannot be queried (no key, no
server) is counted as a failure and listed; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TextIO

from prompt import BenchmarkPrompt, build_messages, get_benchmark, load_template
from utils.cache import DEFAULT_CACHE_DIR, LayoutCache, cache_path, occurrence_indices, select_window
from utils.io import atomic_write_json
from utils.layout import LayoutError, SceneLayout, normalize_prompt, parse_layout
from utils.llm import (LayoutQueryError, LLMConfigError, LLMRequestError, add_llm_arguments, build_client,
                       describe_layout_error, llm_config_from_args, query_layout, resolve_model_name)
from utils.predicates import TaskTally, score_layout

logger = logging.getLogger("eval_stage_one")

# (prompt) -> (reply text, layout); raises LLMConfigError when there is no way to query.
QueryFn = Callable[[str], tuple[str, SceneLayout]]


@dataclass
class StageOneResult:
    tally: TaskTally = field(default_factory=TaskTally.empty)
    records: list[dict] = field(default_factory=list)   # one per scored prompt
    unscored: list[dict] = field(default_factory=list)  # missing or unparsable, counted as failures
    accessed: dict[str, list[str]] = field(default_factory=dict)  # the cache values consumed

    def to_dict(self) -> dict:
        return {**self.tally.to_dict(), "unscored": self.unscored}


def evaluate_stage_one(benchmark: Sequence[BenchmarkPrompt], cache: LayoutCache, window: range,
                       query: QueryFn | None = None, *, verbose: bool = False,
                       output: TextIO | None = None) -> StageOneResult:
    """Score the layouts of ``benchmark[window]``, reading ``cache`` by (prompt, occurrence).

    ``query`` gets a layout for a miss (it should also save it); None, or a query that raises
    :class:`LLMConfigError`, leaves misses unscored.
    """
    output = sys.stdout if output is None else output
    prompts = [normalize_prompt(item.prompt) for item in benchmark]
    occurrences = occurrence_indices(prompts)
    result = StageOneResult()
    cannot_query = None if query is not None else "no LLM client"

    def unscored(index: int, item: BenchmarkPrompt, problem: str) -> None:
        result.tally.add(item.task, False)
        result.unscored.append({"index": index, "prompt": prompts[index], "task": item.task, "problem": problem})
        print(f"NOT SCORED prompt {index} {prompts[index]!r} (counted as a failure): {problem}", file=output)

    for index in window:
        item, prompt, occurrence = benchmark[index], prompts[index], occurrences[index]
        text = cache.get(prompt, occurrence)
        if text is None:
            if cannot_query is not None:
                unscored(index, item, f"no cached reply {occurrence} and no way to query ({cannot_query})")
                continue
            try:
                text, layout = query(prompt)
            except LLMConfigError as error:
                cannot_query = " ".join(str(error).split())
                unscored(index, item, f"no cached reply {occurrence} and no way to query ({cannot_query})")
                continue
            except (LLMRequestError, LayoutQueryError) as error:
                problem = error.problem if isinstance(error, LayoutQueryError) else str(error)
                unscored(index, item, f"no cached reply {occurrence}; querying failed: {problem}")
                continue
        else:
            try:
                layout = parse_layout(text, prompt)
            except LayoutError as error:
                unscored(index, item, f"cached reply {occurrence} does not parse: {describe_layout_error(error)}")
                continue
        result.accessed.setdefault(prompt, []).append(text)
        success = score_layout(item.check, layout)
        result.tally.add(item.task, success)
        result.records.append({"index": index, "prompt": prompt, "task": item.task, "success": success})
        if verbose:
            print(f"[{index}] {prompt}\nEval success ({item.task}): {success}", file=output)
    return result


def build_query(cache: LayoutCache, template_version: str, make_client: Callable, *, max_parse_attempts: int,
                parse_retry_delay_s: float) -> QueryFn:
    """A query for misses that builds the client on first use and saves each parsed reply."""
    template = load_template(template_version)
    clients = []

    def query(prompt: str) -> tuple[str, SceneLayout]:
        if not clients:
            clients.append(make_client())  # LLMConfigError propagates: no way to query
        reply = query_layout(clients[0], build_messages(template, prompt), prompt,
                             max_parse_attempts=max_parse_attempts, parse_retry_delay_s=parse_retry_delay_s)
        cache.append(prompt, reply.text)
        return reply.text, reply.layout

    return query


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stage 1: score cached LLM layouts with the benchmark checks.")
    parser.add_argument("--prompt-type", default="lvd", help="benchmark prompt set (lvd, lvd_static, ...)")
    parser.add_argument("--model", required=True, help="LLM name; names the cache file and answers misses")
    parser.add_argument("--template_version", required=True, help="template, e.g. v0.1")
    parser.add_argument("--skip_first_prompts", type=int, default=0)
    parser.add_argument("--num_prompts", type=int, default=None)
    parser.add_argument("--show-cache-access", action="store_true",
                        help="print the cache values consumed, as JSON, and the number of keys accessed")
    parser.add_argument("--verbose", action="store_true", help="one line per prompt")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--cache-path", type=Path, default=None,
                        help="score this cache file instead of <cache-dir>/cache_<type>_<version>_<model>.json")
    parser.add_argument("--json-out", type=Path, default=None, help="write the scores as JSON")
    add_llm_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    model = resolve_model_name(args.model)
    path = args.cache_path or cache_path(args.prompt_type, args.template_version, model, args.cache_dir)
    try:
        benchmark = get_benchmark(args.prompt_type)
        window = select_window(len(benchmark), args.skip_first_prompts, args.num_prompts)
        cache = LayoutCache.load(path)
        llm_config = llm_config_from_args(args)
        query = build_query(cache, args.template_version, lambda: build_client(llm_config, args.llm_api_key_file),
                            max_parse_attempts=args.parse_attempts, parse_retry_delay_s=args.parse_retry_delay)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Scoring {len(window)} prompts of {args.prompt_type!r} from {path}")
    result = evaluate_stage_one(benchmark, cache, window, query, verbose=args.verbose)

    if args.show_cache_access:
        print(json.dumps(result.accessed, indent=4))
        print(f"Number of keys accessed: {len(result.accessed)}")
    print(result.tally.format_table())
    if result.unscored:
        print(f"{len(result.unscored)} prompt(s) could not be scored and count as failures (see NOT SCORED above)")
    if args.json_out is not None:
        config = {"prompt_type": args.prompt_type, "model": model, "template_version": args.template_version,
                  "cache_path": str(path), "skip_first_prompts": args.skip_first_prompts,
                  "num_prompts": args.num_prompts}
        atomic_write_json(args.json_out, {**result.to_dict(), "config": config})
        print(f"wrote {args.json_out}")
    return 1 if result.unscored else 0


if __name__ == "__main__":
    sys.exit(main())
