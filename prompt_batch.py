"""Stage 1 driver: get a layout for every prompt of a prompt set, from the cache or from an LLM.

Examples::

    python prompt_batch.py --prompt-type lvd --list-prompts
    OPENAI_API_KEY=... python prompt_batch.py --prompt-type demo --model gpt-4-1106-preview \\
        --template_version v0.1 --auto-query --always-save
    python prompt_batch.py --prompt-type lvd --model Qwen/Qwen2.5-7B-Instruct --template_version v0.1 \\
        --auto-query --always-save --llm-base-url http://localhost:8000/v1 --concurrency 16

Behaviour (reference spec 1.3), with these differences that change no saved reply:

- The k-th occurrence of a prompt reads reply k of the cache, also in a shard of the list.
- With ``--auto-query`` up to ``--concurrency`` requests are in flight; replies are handled and
  saved in prompt-list order, so the cache file is the one a sequential run would write.
- Manual mode (no ``--auto-query``) works with chat templates: it prints the chat and reads the
  pasted reply from stdin (the reference's manual mode fails on v0.1).
- A failed request or an unparsable reply is reported in one line and skipped; the batch goes on
  and exits non-zero at the end.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from prompt import (DEFAULT_TEMPLATE_VERSION, PROMPT_TYPES, Template, build_messages, format_messages, get_prompts,
                    load_template)
from utils.cache import DEFAULT_CACHE_DIR, LayoutCache, cache_path, occurrence_indices, select_window
from utils.io import atomic_path
from utils.layout import BACKGROUND_LABEL, LayoutError, SceneLayout, parse_layout
from utils.llm import (LayoutQueryError, LayoutReply, LLMClient, LLMConfigError, LLMRequestError, add_llm_arguments,
                       build_client, describe_layout_error, llm_config_from_args, query_layout, resolve_model_name)

logger = logging.getLogger("prompt_batch")

MAX_CONCURRENCY = 64
DEFAULT_CONCURRENCY = 4
DEFAULT_IMG_ROOT = Path("img_generations")


@dataclass(frozen=True)
class BatchConfig:
    model: str
    prompt_type: str = "demo"
    template_version: str = DEFAULT_TEMPLATE_VERSION
    cache_dir: Path = DEFAULT_CACHE_DIR
    auto_query: bool = False
    always_save: bool = False
    visualize: bool = True             # box GIFs for new replies
    visualize_cache_hit: bool = False  # ... and for cached ones
    concurrency: int = DEFAULT_CONCURRENCY
    skip_first_prompts: int = 0
    num_prompts: int | None = None
    max_parse_attempts: int = 2        # spec 1.3: one retry after an unparsable reply
    parse_retry_delay_s: float = 1.0
    img_root: Path = DEFAULT_IMG_ROOT

    def __post_init__(self):
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be in 1..{MAX_CONCURRENCY}, found {self.concurrency}")
        if self.max_parse_attempts < 1:
            raise ValueError(f"max_parse_attempts must be >= 1, found {self.max_parse_attempts}")

    @property
    def cache_path(self) -> Path:
        return cache_path(self.prompt_type, self.template_version, self.model, self.cache_dir)

    @property
    def img_dir(self) -> Path:
        """Where box GIFs go (spec 1.3)."""
        return Path(self.img_root) / f"imgs_{self.prompt_type}_template{self.template_version}"


@dataclass
class BatchSummary:
    total: int = 0
    hits: int = 0
    new: int = 0
    not_saved: int = 0
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (index, prompt, problem)

    @property
    def ok(self) -> bool:
        return not self.failures

    def format(self) -> str:
        return (f"{self.total} prompts: {self.hits} from the cache, {self.new} new, {len(self.failures)} failed"
                + (f", {self.not_saved} not saved" if self.not_saved else ""))


def read_pasted_reply(stream: TextIO) -> str | None:
    """Lines up to the empty line after the ``Background keyword:`` line, or to EOF; None if none."""
    lines = []
    seen_background = False
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        if seen_background and not line.strip():
            break
        lines.append(line)
        seen_background = seen_background or f"{BACKGROUND_LABEL}:" in line
    text = "\n".join(lines).strip()
    return text or None


def save_layout_visualization(layout: SceneLayout, img_dir: Path, index: int) -> Path:
    """``<img_dir>/boxes_<index>.gif``, copied to ``boxes.gif`` as the latest (spec 2.6)."""
    from utils.visualize import save_layout_gif  # the drawing code is imported only when drawing

    Path(img_dir).mkdir(parents=True, exist_ok=True)
    path = Path(img_dir) / f"boxes_{index}.gif"
    save_layout_gif(layout, path)
    with atomic_path(Path(img_dir) / "boxes.gif") as tmp_path:
        shutil.copyfile(path, tmp_path)
    return path


class _Visualizer:
    """Draws box GIFs; a missing drawing module or a failed drawing warns and never stops the batch."""

    def __init__(self, img_dir: Path):
        self.img_dir = img_dir
        self.available = True

    def __call__(self, layout: SceneLayout, index: int) -> None:
        if not self.available:
            return
        try:
            save_layout_visualization(layout, self.img_dir, index)
        except ImportError as error:
            self.available = False
            logger.warning("layout GIFs are off: cannot import the drawing code (%s)", error)
        except (OSError, ValueError, RuntimeError) as error:
            logger.warning("prompt %d: could not draw the layout GIF: %s", index, error)


def _ask_save(input_stream: TextIO, output: TextIO) -> bool | None:
    """True for y/Y, False for any other answer (ask again), None at end of input."""
    output.write("Save (y/n)? ")
    output.flush()
    answer = input_stream.readline()
    if not answer:
        return None
    return answer.strip() in ("y", "Y")


def _paste_layout(template: Template, prompt: str, config: BatchConfig, input_stream: TextIO,
                  output: TextIO) -> LayoutReply:
    """Manual mode: print the chat, read a pasted reply, parse it (same attempts as auto mode)."""
    output.write(format_messages(build_messages(template, prompt)) + "\n\n")
    errors = []
    for attempt in range(1, config.max_parse_attempts + 1):
        output.write(f"Paste the reply for {prompt!r}; end it with an empty line after the "
                     f"'{BACKGROUND_LABEL}:' line (or end of input):\n")
        output.flush()
        text = read_pasted_reply(input_stream)
        if text is None:
            errors.append("no reply given (end of input)")
            break
        try:
            return LayoutReply(text=text, layout=parse_layout(text, prompt), attempts=attempt)
        except LayoutError as error:
            errors.append(describe_layout_error(error))
            output.write(f"The reply does not parse: {errors[-1]}\n")
    raise LayoutQueryError(prompt, errors)


def run_batch(config: BatchConfig, client_factory: Callable[[], LLMClient] | None = None, *,
              input_stream: TextIO | None = None, output: TextIO | None = None,
              show_progress: bool = True) -> BatchSummary:
    """Get a layout for every prompt in the window; save new ones; return the counts.

    ``client_factory`` is called once, and only if a cache miss must be queried. Raises only for
    setup problems (unknown template, unreadable cache, no client); per-prompt problems are reported
    on ``output`` and counted in the summary.
    """
    input_stream = sys.stdin if input_stream is None else input_stream
    output = sys.stdout if output is None else output
    prompts = get_prompts(config.prompt_type)
    occurrences = occurrence_indices(prompts)
    window = select_window(len(prompts), config.skip_first_prompts, config.num_prompts)
    template = load_template(config.template_version)
    cache = LayoutCache.load(config.cache_path)
    misses = [i for i in window if cache.get(prompts[i], occurrences[i]) is None]
    logger.info("%s: %d prompts in the window, %d cached, %d to query", config.cache_path, len(window),
                len(window) - len(misses), len(misses))
    summary = BatchSummary(total=len(window))
    visualize = _Visualizer(config.img_dir)

    def report_failure(index: int, problem: str) -> None:
        problem = " ".join(problem.split())
        summary.failures.append((index, prompts[index], problem))
        tqdm.write(f"FAILED prompt {index} {prompts[index]!r}: {problem}", file=output)

    pool = None
    pending: dict[int, Future] = {}
    if misses and config.auto_query:
        if client_factory is None:
            raise LLMConfigError("cache misses must be queried, but no LLM client was given")
        client = client_factory()

        def ask_llm(index: int) -> LayoutReply:
            messages = build_messages(template, prompts[index])
            return query_layout(client, messages, prompts[index], max_parse_attempts=config.max_parse_attempts,
                                parse_retry_delay_s=config.parse_retry_delay_s)

        # All misses are submitted now; the pool keeps `concurrency` of them in flight, and the
        # loop below consumes them in list order, so early replies simply wait in their futures.
        pool = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="llm")
        pending = {i: pool.submit(ask_llm, i) for i in misses}

    def get_reply(index: int, first: bool) -> LayoutReply:
        if pool is None:
            return _paste_layout(template, prompts[index], config, input_stream, output)
        return (pending.pop(index) if first else pool.submit(ask_llm, index)).result()

    def process_hit(index: int) -> None:
        prompt, occurrence = prompts[index], occurrences[index]
        try:
            layout = parse_layout(cache.get(prompt, occurrence), prompt)
        except LayoutError as error:
            report_failure(index, f"cached reply {occurrence} does not parse: {describe_layout_error(error)}")
            return
        summary.hits += 1
        if config.visualize_cache_hit:
            visualize(layout, index)

    def process_miss(index: int) -> None:
        prompt, occurrence = prompts[index], occurrences[index]
        first = True
        while True:
            try:
                reply = get_reply(index, first)
            except (LLMRequestError, LayoutQueryError) as error:
                report_failure(index, error.problem if isinstance(error, LayoutQueryError) else str(error))
                return
            first = False
            if config.visualize:
                visualize(reply.layout, index)
            save = True
            if not config.always_save:
                output.write(f"Reply for prompt {index} {prompt!r}:\n{reply.text}\n")
                save = _ask_save(input_stream, output)
            if save is None:
                summary.not_saved += 1
                return
            if save:
                stored = cache.append(prompt, reply.text)
                if stored != occurrence:
                    logger.warning("prompt %d %r: the reply was saved as reply %d of this prompt, but this run "
                                   "wanted reply %d (earlier occurrences are not cached yet)",
                                   index, prompt, stored, occurrence)
                summary.new += 1
                return
            # Any answer but y/Y asks again (spec 1.3).

    miss_set = set(misses)
    progress = tqdm(total=len(window), desc="layouts", unit="prompt", file=sys.stderr,
                    disable=not show_progress or (bool(misses) and not config.auto_query))
    finished = False
    try:
        with logging_redirect_tqdm():
            for index in window:
                (process_miss if index in miss_set else process_hit)(index)
                progress.update()
        finished = True
    finally:
        progress.close()
        if pool is not None:
            # On Ctrl-C, drop the queued requests and do not wait for those in flight.
            pool.shutdown(wait=finished, cancel_futures=True)
    return summary


# --------------------------------------------------------------------------------------------
# Command line


def _bounded_concurrency(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_CONCURRENCY:
        raise argparse.ArgumentTypeError(f"must be in 1..{MAX_CONCURRENCY}, found {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Stage 1: get layouts for a prompt set from the cache or an LLM.")
    parser.add_argument("--prompt-type", default="demo", choices=PROMPT_TYPES, help="prompt set")
    parser.add_argument("--model", help="LLM name (gpt-3.5 and vicuna are aliases); names the cache file")
    parser.add_argument("--template_version", help=f"template, e.g. {DEFAULT_TEMPLATE_VERSION}")
    parser.add_argument("--auto-query", action="store_true",
                        help="query the LLM; without it, print the chat and read a pasted reply from stdin")
    parser.add_argument("--always-save", action="store_true", help="save new replies without asking")
    parser.add_argument("--no-visualize", action="store_true", help="no box GIFs for new replies")
    parser.add_argument("--visualize-cache-hit", action="store_true", help="also draw box GIFs for cached replies")
    parser.add_argument("--unnormalize-boxes-before-save", action="store_true",
                        help="accepted for compatibility; has no effect (as in the reference)")
    parser.add_argument("--list-prompts", action="store_true",
                        help="print the prompt list of --prompt-type, one per line with repeats, and exit")
    parser.add_argument("--concurrency", type=_bounded_concurrency, default=DEFAULT_CONCURRENCY,
                        help=f"LLM requests in flight at once (1..{MAX_CONCURRENCY}); results are saved in "
                             f"prompt order either way")
    parser.add_argument("--skip_first_prompts", type=int, default=0, help="skip prompt indices below this")
    parser.add_argument("--num_prompts", type=int, default=None, help="only this many prompts after the skipped")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--img-dir", type=Path, default=DEFAULT_IMG_ROOT, help="root of the box GIF folders")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_llm_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_prompts:
        for prompt in get_prompts(args.prompt_type):
            print(prompt)
        return 0
    missing = [flag for flag, value in (("--model", args.model), ("--template_version", args.template_version))
               if not value]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        llm_config = llm_config_from_args(args)
        config = BatchConfig(model=resolve_model_name(args.model), prompt_type=args.prompt_type,
                             template_version=args.template_version, cache_dir=args.cache_dir,
                             auto_query=args.auto_query, always_save=args.always_save,
                             visualize=not args.no_visualize, visualize_cache_hit=args.visualize_cache_hit,
                             concurrency=args.concurrency, skip_first_prompts=args.skip_first_prompts,
                             num_prompts=args.num_prompts, max_parse_attempts=args.parse_attempts,
                             parse_retry_delay_s=args.parse_retry_delay, img_root=args.img_dir)
        summary = run_batch(config, lambda: build_client(llm_config, args.llm_api_key_file),
                            show_progress=not args.quiet)
    except (LLMConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Summary ({config.cache_path}): {summary.format()}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
