"""Stage-1 evaluation: score the cached LLM layouts of a benchmark with its checks (spec 10.1).

    python scripts/eval_stage_one.py --prompt-type lvd --template_version v0.1 --model gpt-4-1106-preview \\
        --cache-dir path/to/published_caches
    python scripts/eval_stage_one.py --prompt-type lvd --template_version v0.1 --model gpt-3.5-turbo \\
        --cache-path path/to/cache_lvd_v0.1_gpt-3.5-turbo.json --json-out eval_outputs/stage_one.json

Each benchmark entry reads the cached reply of its occurrence (the k-th time a prompt occurs it
reads reply k, also in a shard), builds the 6-frame condition with stripped phrases and applies
the entry's check. The cache file must exist: a missing one is one error line that says where the
authors' published caches come from (the reference would have queried GPT-4 for all 500 prompts).
A miss in an existing cache is queried and saved like the reference does (utils.planner), but the
LLM client is built only then: a complete cache needs no API key. A miss that cannot be queried
(no key, no server, an endpoint that fails every request) is counted as a failure and listed; the
exit status is then 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TextIO

from prompt import BENCHMARK_PROMPT_TYPES, BenchmarkPrompt, build_messages, get_benchmark, load_template
from utils.cache import (DEFAULT_CACHE_DIR, CacheFormatError, LayoutCache, cache_path, describe_missing_cache,
                         occurrence_indices, select_window)
from utils.cli import ensure_writable_dir, int_in, run_cli
from utils.io import atomic_write_json
from utils.layout import LayoutError, normalize_prompt, validate_layout_for_generation
from utils.llm import (DEFAULT_MAX_ENDPOINT_FAILURES, EndpointFailureGuard, LayoutQueryError, LayoutReply, LLMClient,
                       LLMConfigError, LLMEndpointError, LLMRequestError, add_llm_arguments, build_client,
                       describe_layout_error, llm_config_from_args, query_layout, resolve_model_name)
from utils.planner import CacheMissError, QueryFn, load_or_query_layout
from utils.predicates import TaskTally, score_layout
from utils.redact import redact_secrets

logger = logging.getLogger("eval_stage_one")

# NOT SCORED lines printed before the rest are summed up in one line (all are in --json-out).
MAX_LISTED_UNSCORED = 10


@dataclass
class StageOneResult:
    tally: TaskTally = field(default_factory=TaskTally.empty)
    records: list[dict] = field(default_factory=list)   # one per scored prompt
    unscored: list[dict] = field(default_factory=list)  # missing or unparsable, counted as failures
    accessed: dict[str, list[str]] = field(default_factory=dict)  # the cache values consumed
    stopped_querying: str | None = None                 # why misses were no longer queried

    def to_dict(self) -> dict:
        return {**self.tally.to_dict(), "unscored": self.unscored}


def evaluate_stage_one(benchmark: Sequence[BenchmarkPrompt], cache: LayoutCache, window: range,
                       query: QueryFn | None = None, *, verbose: bool = False, output: TextIO | None = None,
                       max_endpoint_failures: int = DEFAULT_MAX_ENDPOINT_FAILURES,
                       max_listed: int | None = MAX_LISTED_UNSCORED,
                       secrets: Sequence[str] = ()) -> StageOneResult:
    """Score the layouts of ``benchmark[window]``, reading ``cache`` by (prompt, occurrence).

    ``query`` gets a layout for a miss (:func:`utils.planner.load_or_query_layout` saves it); None, a
    query that raises :class:`LLMConfigError`, or an endpoint that fails ``max_endpoint_failures``
    prompts in a row leaves the remaining misses unscored. At most ``max_listed`` NOT SCORED lines are
    printed, then one line for the rest.
    """
    output = sys.stdout if output is None else output
    prompts = [normalize_prompt(item.prompt) for item in benchmark]
    occurrences = occurrence_indices(prompts)
    result = StageOneResult()
    cannot_query = None if query is not None else "no LLM client"
    guard = EndpointFailureGuard(max_endpoint_failures)

    def unscored(index: int, item: BenchmarkPrompt, problem: str) -> None:
        problem = redact_secrets(" ".join(problem.split()), secrets)
        result.tally.add(item.task, False)
        result.unscored.append({"index": index, "prompt": prompts[index], "task": item.task, "problem": problem})
        if max_listed is None or len(result.unscored) <= max_listed:
            print(f"NOT SCORED prompt {index} {prompts[index]!r} (counted as a failure): {problem}", file=output)

    for index in window:
        item, prompt, occurrence = benchmark[index], prompts[index], occurrences[index]
        try:
            planned = load_or_query_layout(cache, prompt, occurrence, None if cannot_query else query)
        except LayoutError as error:
            unscored(index, item, f"cached reply {occurrence} does not parse: {describe_layout_error(error)}")
            continue
        except CacheMissError:  # no query, or no more querying
            unscored(index, item, f"no cached reply {occurrence} and no way to query ({cannot_query})")
            continue
        except LLMConfigError as error:
            cannot_query = " ".join(str(error).split())
            unscored(index, item, f"no cached reply {occurrence} and no way to query ({cannot_query})")
            continue
        except (LLMRequestError, LayoutQueryError) as error:
            problem = error.problem if isinstance(error, LayoutQueryError) else str(error)
            unscored(index, item, f"no cached reply {occurrence}; querying failed: {problem}")
            try:
                guard.record(error)
            except LLMEndpointError as stop:
                cannot_query = result.stopped_querying = redact_secrets(str(stop), secrets)
                print(f"querying {cannot_query}; the remaining misses are not scored", file=output)
            continue
        if planned.source == "llm":
            guard.record(None)
        result.accessed.setdefault(prompt, []).append(planned.text)
        success = score_layout(item.check, planned.layout)
        result.tally.add(item.task, success)
        result.records.append({"index": index, "prompt": prompt, "task": item.task, "success": success})
        if verbose:
            print(f"[{index}] {prompt}\nEval success ({item.task}): {success}", file=output)
    if max_listed is not None and len(result.unscored) > max_listed:
        print(f"NOT SCORED: {len(result.unscored) - max_listed} more prompt(s), not listed (all are in --json-out)",
              file=output)
    return result


def build_query(template_version: str, make_client: Callable[[], LLMClient], *, max_parse_attempts: int,
                parse_retry_delay_s: float, secrets: list[str] | None = None) -> QueryFn:
    """A query for misses that builds the client (and the CLIP tokenizer) on first use.

    New replies must be usable by stage 2 (:func:`validate_layout_for_generation`), else they are
    asked again; the caller saves them (:func:`utils.planner.load_or_query_layout`). The client's
    secrets are added to ``secrets`` for the caller's redaction.
    """
    template = load_template(template_version)
    state: dict = {}

    def check(layout) -> None:
        if "tokenizer" not in state:
            from models.tokenizer import build_clip_tokenizer

            state["tokenizer"] = build_clip_tokenizer()
        validate_layout_for_generation(layout, state["tokenizer"])

    def query(prompt: str) -> LayoutReply:
        if "client" not in state:
            state["client"] = make_client()  # LLMConfigError propagates: no way to query
            if secrets is not None:
                secrets.extend(state["client"].secrets)
        return query_layout(state["client"], build_messages(template, prompt), prompt,
                            max_parse_attempts=max_parse_attempts, parse_retry_delay_s=parse_retry_delay_s,
                            validate=check)

    return query


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Stage 1: score cached LLM layouts with the benchmark checks.")
    parser.add_argument("--prompt-type", default="lvd", choices=sorted(BENCHMARK_PROMPT_TYPES),
                        help="benchmark prompt set")
    parser.add_argument("--model", required=True, help="LLM name; names the cache file and answers misses")
    parser.add_argument("--template_version", required=True, help="template, e.g. v0.1")
    parser.add_argument("--skip_first_prompts", type=int_in(0), default=0, help="skip prompt indices below this")
    parser.add_argument("--num_prompts", type=int_in(1), default=None,
                        help="only this many prompts after the skipped (at least 1)")
    parser.add_argument("--show-cache-access", action="store_true",
                        help="print the cache values consumed, as JSON, and the number of keys accessed")
    parser.add_argument("--verbose", action="store_true", help="one line per prompt")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="folder of the layout caches, e.g. the one holding the authors' published caches")
    parser.add_argument("--cache-path", type=Path, default=None,
                        help="score this cache file instead of <cache-dir>/cache_<type>_<version>_<model>.json")
    parser.add_argument("--json-out", type=Path, default=None, help="write the scores as JSON")
    add_llm_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    model = resolve_model_name(args.model)
    path = args.cache_path or cache_path(args.prompt_type, args.template_version, model, args.cache_dir)
    flag = "--cache-path" if args.cache_path else "--cache-dir"
    if not path.is_file():
        print(f"error: {describe_missing_cache(path, flag)}", file=sys.stderr)
        return 2
    secrets: list[str] = []
    try:
        if args.json_out is not None:
            ensure_writable_dir(args.json_out.parent, "--json-out")
        benchmark = get_benchmark(args.prompt_type)
        window = select_window(len(benchmark), args.skip_first_prompts, args.num_prompts)
        cache = LayoutCache.load(path)
        llm_config = llm_config_from_args(args)
        query = build_query(args.template_version, lambda: build_client(llm_config, args.llm_api_key_file),
                            max_parse_attempts=args.parse_attempts, parse_retry_delay_s=args.parse_retry_delay,
                            secrets=secrets)
    except CacheFormatError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"Scoring {len(window)} prompts of {args.prompt_type!r} from {path}")
    try:
        result = evaluate_stage_one(benchmark, cache, window, query, verbose=args.verbose,
                                    max_endpoint_failures=args.llm_max_endpoint_failures, secrets=secrets)
    except OSError as error:  # the cache cannot be written (a new reply to save)
        print(f"error: {redact_secrets(' '.join(str(error).split()), secrets)}", file=sys.stderr)
        return 2

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
    sys.exit(run_cli(main, interrupt_hint="rerun the same command (replies queried so far are saved)"))
