"""Stage 1 driver: get a layout for every prompt of a prompt set, from the cache or from an LLM.

Examples::

    python prompt_batch.py --prompt-type lvd --list-prompts
    OPENAI_API_KEY=... python prompt_batch.py --prompt-type demo --model gpt-4-1106-preview \\
        --template_version v0.1 --auto-query --always-save
    python prompt_batch.py --prompt-type lvd --model Qwen/Qwen2.5-7B-Instruct --template_version v0.1 \\
        --auto-query --always-save --llm-base-url http://localhost:8000/v1 --concurrency 16
    python prompt_batch.py --prompts "A cat jumps onto a sofa" "A dog runs to the left" --model gpt-4 \\
        --template_version v0.1 --auto-query --always-save     # prompt type "custom"

Behaviour (reference spec 1.3), with these differences that change no saved reply:

- The k-th occurrence of a prompt reads reply k of the cache, also in a shard of the list, and a
  reply is saved only if its (prompt, occurrence) has none yet (utils.planner.load_or_query_layout).
- With ``--auto-query`` up to ``--concurrency`` requests are in flight; replies are handled and
  saved in prompt-list order, so the cache file is the one a sequential run would write.
- Manual mode (no ``--auto-query``) works with chat templates: it prints the chat and reads the
  pasted reply from stdin (the reference's manual mode fails on v0.1).
- A failed request or an unparsable reply is reported in one line and skipped; the batch goes on
  and exits non-zero at the end. When the endpoint is unusable (it cannot be reached, or rejects
  the key, model or request) for ``--llm-max-endpoint-failures`` prompts in a row, the batch stops
  with one line saying why; what was saved stays saved.
- A new reply is saved only if stage 2 can use it: its layout must also build the diffusion
  condition with the CLIP tokenizer (utils.layout.validate_layout_for_generation); else it is asked
  again, like an unparsable one.
- Secrets (the API key, any ``sk-...`` token) never reach the console.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from prompt import (ALL_PROMPT_TYPES, CUSTOM_PROMPT_TYPE, DEFAULT_TEMPLATE_VERSION, PromptListError, Template,
                    build_messages, format_messages, get_prompts, load_template, resolve_prompts)
from utils.cache import (DEFAULT_CACHE_DIR, PUBLISHED_CACHE_FILES, CacheFormatError, LayoutCache, cache_path,
                         describe_missing_cache, occurrence_indices, recover_interrupted_writes, select_window)
from utils.cli import ensure_writable_dir, int_in, run_cli
from utils.io import atomic_path
from utils.layout import (BACKGROUND_LABEL, LayoutError, SceneLayout, parse_layout, validate_layout,
                          validate_layout_for_generation)
from utils.llm import (DEFAULT_MAX_ENDPOINT_FAILURES, EndpointFailureGuard, LayoutQueryError, LayoutReply, LLMClient,
                       LLMConfigError, LLMEndpointError, LLMRequestError, add_llm_arguments, build_client,
                       describe_layout_error, llm_config_from_args, query_layout, resolve_model_name)
from utils.planner import load_or_query_layout
from utils.redact import redact_secrets

logger = logging.getLogger("prompt_batch")

MAX_CONCURRENCY = 64
DEFAULT_CONCURRENCY = 4
DEFAULT_IMG_ROOT = Path("img_generations")
INTERRUPT_HINT = "the replies saved so far are kept; rerun the same command to resume"

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
    prompts: tuple[str, ...] | None = None  # free text (prompt type "custom"); None: the prompt type's set
    max_endpoint_failures: int = DEFAULT_MAX_ENDPOINT_FAILURES
    check_for_generation: bool = True  # also build the stage-2 condition with the CLIP tokenizer

    def __post_init__(self):
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be in 1..{MAX_CONCURRENCY}, found {self.concurrency}")
        if self.max_parse_attempts < 1:
            raise ValueError(f"max_parse_attempts must be >= 1, found {self.max_parse_attempts}")
        if self.skip_first_prompts < 0 or (self.num_prompts is not None and self.num_prompts < 1):
            raise ValueError(f"skip_first_prompts must be >= 0 and num_prompts >= 1, found "
                             f"{self.skip_first_prompts} and {self.num_prompts}")
        if self.prompt_type == CUSTOM_PROMPT_TYPE and not self.prompts:
            raise ValueError(f"prompt type {CUSTOM_PROMPT_TYPE!r} needs its prompts (--prompts / --prompts-file)")

    @property
    def cache_path(self) -> Path:
        return cache_path(self.prompt_type, self.template_version, self.model, self.cache_dir)

    @property
    def img_dir(self) -> Path:
        """Where box GIFs go (spec 1.3)."""
        return Path(self.img_root) / f"imgs_{self.prompt_type}_template{self.template_version}"

    def prompt_list(self) -> list[str]:
        return list(self.prompts) if self.prompts is not None else get_prompts(self.prompt_type)


@dataclass
class BatchSummary:
    total: int = 0
    hits: int = 0
    new: int = 0
    not_saved: int = 0
    not_run: int = 0                   # left out because the batch stopped
    stopped: str | None = None         # why the batch stopped early, in one line
    failures: list[tuple[int, str, str]] = field(default_factory=list)  # (index, prompt, problem)

    @property
    def ok(self) -> bool:
        return not self.failures and self.stopped is None

    def format(self) -> str:
        return (f"{self.total} prompts: {self.hits} from the cache, {self.new} new, {len(self.failures)} failed"
                + (f", {self.not_saved} not saved" if self.not_saved else "")
                + (f", {self.not_run} not run" if self.not_run else ""))


class _EndOfInput(Exception):
    """Manual mode: stdin is exhausted, so no later prompt can get a reply either."""


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


class _GenerationCheck:
    """:func:`validate_layout_for_generation` with the CLIP tokenizer, built on first use (thread-safe).

    Without the tokenizer (its files are missing) it warns once and checks what it can without it.
    """

    def __init__(self, enabled: bool = True):
        self._enabled = enabled
        self._tokenizer = None
        self._lock = threading.Lock()

    def __call__(self, layout: SceneLayout) -> None:
        with self._lock:
            if self._enabled and self._tokenizer is None:
                try:
                    from models.tokenizer import build_clip_tokenizer

                    self._tokenizer = build_clip_tokenizer()
                except (ImportError, OSError) as error:
                    self._enabled = False
                    logger.warning("phrases are not checked against the CLIP tokenizer (it cannot be built: %s); "
                                   "a saved layout may still fail in generate.py", " ".join(str(error).split()))
            if self._tokenizer is None:
                validate_layout(layout)
            else:
                validate_layout_for_generation(layout, self._tokenizer)


def _ask_save(input_stream: TextIO, output: TextIO) -> bool | None:
    """True for y/Y, False for any other answer (ask again), None at end of input."""
    output.write("Save (y/n)? ")
    output.flush()
    answer = input_stream.readline()
    if not answer:
        return None
    return answer.strip() in ("y", "Y")


def _paste_layout(template: Template, prompt: str, config: BatchConfig, input_stream: TextIO,
                  output: TextIO, validate: Callable[[SceneLayout], None]) -> LayoutReply:
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
            raise _EndOfInput(LayoutQueryError(prompt, errors))
        try:
            layout = parse_layout(text, prompt)
            validate(layout)
            return LayoutReply(text=text, layout=layout, attempts=attempt)
        except LayoutError as error:
            errors.append(describe_layout_error(error))
            output.write(f"The reply does not parse: {errors[-1]}\n")
    raise LayoutQueryError(prompt, errors)


def run_batch(config: BatchConfig, client_factory: Callable[[], LLMClient] | None = None, *,
              input_stream: TextIO | None = None, output: TextIO | None = None,
              show_progress: bool = True) -> BatchSummary:
    """Get a layout for every prompt in the window; save new ones; return the counts.

    ``client_factory`` is called once, and only if a cache miss must be queried. Raises only for
    setup problems (unknown template, unreadable cache, no client, unwritable folder); per-prompt
    problems are reported on ``output`` and counted in the summary, and a batch stopped early (an
    unusable endpoint, end of input) says why in ``summary.stopped``.
    """
    batch = _BatchRun(config, sys.stdin if input_stream is None else input_stream,
                      sys.stdout if output is None else output)
    return batch.run(client_factory, show_progress)


class _BatchRun:
    """One ``run_batch`` call: the window, the cache and its misses, the LLM pool, the summary."""

    def __init__(self, config: BatchConfig, input_stream: TextIO, output: TextIO):
        self.config, self.input_stream, self.output = config, input_stream, output
        self.prompts = config.prompt_list()
        self.occurrences = occurrence_indices(self.prompts)
        self.window = select_window(len(self.prompts), config.skip_first_prompts, config.num_prompts)
        self.template = load_template(config.template_version)
        self.cache = self._open_cache()
        self.misses = [i for i in self.window if self.cache.get(self.prompts[i], self.occurrences[i]) is None]
        self._prepare_folders()
        self.summary = BatchSummary(total=len(self.window))
        self.visualize = _Visualizer(config.img_dir)
        self.check = _GenerationCheck(config.check_for_generation)
        self.guard = EndpointFailureGuard(config.max_endpoint_failures)
        self.secrets: list[str] = []
        self.client: LLMClient | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.pending: dict[int, Future] = {}

    def _open_cache(self) -> LayoutCache:
        path = self.config.cache_path
        if self.window and not path.exists():
            ensure_writable_dir(path.parent, "--cache-dir")  # a new cache will be written there
        if path.exists():
            recover_interrupted_writes(path)  # temp files of a killed cache write
        return LayoutCache.load(path)

    def _prepare_folders(self) -> None:
        config, path, misses = self.config, self.config.cache_path, self.misses
        logger.info("%s: %d prompts in the window, %d cached, %d to query", path, len(self.window),
                    len(self.window) - len(misses), len(misses))
        if misses and not path.exists():
            # A new model name simply starts a new cache; only a published cache's name means one was to be read.
            published = path.name in PUBLISHED_CACHE_FILES
            (logger.warning if published else logger.info)(
                "%s; %d prompt(s) need a reply, saved to a new cache there",
                describe_missing_cache(path, how_to_make=False) if published else f"new layout cache {path}",
                len(misses))
        if misses:
            ensure_writable_dir(path.parent, "--cache-dir")
        if (config.visualize and misses) or (config.visualize_cache_hit and len(misses) < len(self.window)):
            ensure_writable_dir(config.img_dir, "--img-dir")

    # -- the LLM side

    def _start_queries(self, client_factory: Callable[[], LLMClient] | None) -> None:
        if not (self.misses and self.config.auto_query):
            return
        if client_factory is None:
            raise LLMConfigError("cache misses must be queried, but no LLM client was given")
        self.client = client_factory()
        self.secrets.extend(self.client.secrets)
        # All misses are submitted now; the pool keeps `concurrency` of them in flight, and the
        # loop consumes them in list order, so early replies simply wait in their futures.
        self.pool = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="llm")
        self.pending = {i: self.pool.submit(self._ask_llm, i) for i in self.misses}

    def _ask_llm(self, index: int) -> LayoutReply:
        config, prompt = self.config, self.prompts[index]
        return query_layout(self.client, build_messages(self.template, prompt), prompt,
                            max_parse_attempts=config.max_parse_attempts,
                            parse_retry_delay_s=config.parse_retry_delay_s, validate=self.check)

    def _query_for(self, index: int) -> Callable[[str], LayoutReply]:
        """The first ask takes the reply already in flight; a repeated ask (reply refused) sends a new request."""
        first = [True]

        def query(prompt: str) -> LayoutReply:
            if self.pool is None:
                return _paste_layout(self.template, prompt, self.config, self.input_stream, self.output, self.check)
            if first[0]:
                first[0] = False
                return self.pending.pop(index).result()
            return self.pool.submit(self._ask_llm, index).result()

        return query

    def _accept_for(self, index: int) -> Callable[[LayoutReply], bool | None]:
        def accept(reply: LayoutReply) -> bool | None:
            if self.config.visualize:
                self.visualize(reply.layout, index)
            if self.config.always_save:
                return True
            self.output.write(f"Reply for prompt {index} {self.prompts[index]!r}:\n"
                              f"{redact_secrets(reply.text, self.secrets)}\n")
            answer = _ask_save(self.input_stream, self.output)
            if answer is None:
                raise _EndOfInput(None)
            return answer  # any answer but y/Y asks again (spec 1.3)

        return accept

    # -- one prompt, and the loop

    def _report_failure(self, index: int, problem: str) -> None:
        problem = redact_secrets(" ".join(problem.split()), self.secrets)
        self.summary.failures.append((index, self.prompts[index], problem))
        tqdm.write(f"FAILED prompt {index} {self.prompts[index]!r}: {problem}", file=self.output)

    def _process(self, index: int, is_miss: bool) -> None:
        prompt, occurrence = self.prompts[index], self.occurrences[index]
        try:
            # New replies are checked for stage 2 inside the query (so a bad one is asked again); a cached
            # one was checked when it was saved (or is a published one, all of which pass), so it is only
            # parsed here and a run that only reads the cache needs no tokenizer.
            planned = load_or_query_layout(self.cache, prompt, occurrence,
                                           self._query_for(index) if is_miss else None,
                                           accept=self._accept_for(index))
        except LayoutError as error:
            self._report_failure(index, f"cached reply {occurrence} does not parse: {describe_layout_error(error)}")
            return
        except (LLMRequestError, LayoutQueryError) as error:
            self._report_failure(index, error.problem if isinstance(error, LayoutQueryError) else str(error))
            self.guard.record(error)  # raises LLMEndpointError at the limit
            return
        if is_miss:
            self.guard.record(None)
        if planned.source == "llm":
            self.summary.new += 1  # saved by this process (another one may have stored this occurrence first)
        else:
            self.summary.hits += 1
            if self.config.visualize_cache_hit:
                self.visualize(planned.layout, index)

    def _loop(self, progress: tqdm) -> int:
        """Processes the window in order; the number of prompts done (a stop says why in the summary)."""
        summary, miss_set, done = self.summary, set(self.misses), 0
        for index in self.window:
            try:
                self._process(index, index in miss_set)
            except LLMEndpointError as error:
                summary.stopped = redact_secrets(str(error), self.secrets)
                return done + 1
            except _EndOfInput as end:
                if end.args[0] is not None:  # no reply pasted: a failure of this prompt
                    self._report_failure(index, end.args[0].problem)
                else:
                    summary.not_saved += 1
                done += 1
                if done < len(self.window):
                    summary.stopped = f"end of input after prompt {index}: the remaining prompts were not asked"
                return done
            done += 1
            progress.update()
        return done

    def run(self, client_factory: Callable[[], LLMClient] | None, show_progress: bool) -> BatchSummary:
        self._start_queries(client_factory)
        progress = tqdm(total=len(self.window), desc="layouts", unit="prompt", file=sys.stderr,
                        disable=not show_progress or (bool(self.misses) and not self.config.auto_query))
        finished = False
        try:
            with logging_redirect_tqdm():
                self.summary.not_run = len(self.window) - self._loop(progress)
            finished = True
        finally:
            if not finished:
                progress.leave = False  # an interrupted bar would show a count that means nothing
            progress.close()
            if self.client is not None and (not finished or self.summary.stopped is not None):
                self.client.close()  # backoff waits end, queued requests send nothing
            if self.pool is not None:
                # On Ctrl-C, drop the queued requests and do not wait for those in flight.
                self.pool.shutdown(wait=finished, cancel_futures=True)
        return self.summary


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Stage 1: get layouts for a prompt set from the cache or an LLM.")
    parser.add_argument("--prompt-type", default=None, choices=ALL_PROMPT_TYPES,
                        help=f"prompt set (default demo); {CUSTOM_PROMPT_TYPE} is the type of --prompts / "
                             f"--prompts-file")
    free_text = parser.add_mutually_exclusive_group()
    free_text.add_argument("--prompts", nargs="+", metavar="PROMPT", default=None,
                           help=f"free-text prompts instead of a prompt set (prompt type {CUSTOM_PROMPT_TYPE!r}: "
                                f"cache_{CUSTOM_PROMPT_TYPE}_<version>_<model>.json)")
    free_text.add_argument("--prompts-file", default=None, metavar="FILE",
                           help="a file of prompts, one per line (empty lines and # comments are skipped)")
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
                        help="print the prompt list, one per line with repeats, and exit")
    parser.add_argument("--concurrency", type=int_in(1, MAX_CONCURRENCY), default=DEFAULT_CONCURRENCY,
                        help=f"LLM requests in flight at once (1..{MAX_CONCURRENCY}); results are saved in "
                             f"prompt order either way")
    parser.add_argument("--skip_first_prompts", type=int_in(0), default=0, help="skip prompt indices below this")
    parser.add_argument("--num_prompts", type=int_in(1), default=None,
                        help="only this many prompts after the skipped (at least 1)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="folder of the layout caches (e.g. one holding the authors' published caches)")
    parser.add_argument("--img-dir", type=Path, default=DEFAULT_IMG_ROOT, help="root of the box GIF folders")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_llm_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        prompt_list = resolve_prompts(args.prompt_type, args.prompts, args.prompts_file)
    except PromptListError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.list_prompts:
        for prompt in prompt_list.prompts:
            print(prompt)
        return 0
    missing = [flag for flag, value in (("--model", args.model), ("--template_version", args.template_version))
               if not value]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    secrets: list[str] = []
    try:
        llm_config = llm_config_from_args(args)

        def make_client() -> LLMClient:
            client = build_client(llm_config, args.llm_api_key_file)
            secrets.extend(client.secrets)
            return client

        free_text = prompt_list.prompt_type == CUSTOM_PROMPT_TYPE
        config = BatchConfig(model=resolve_model_name(args.model), prompt_type=prompt_list.prompt_type,
                             prompts=prompt_list.prompts if free_text else None,
                             template_version=args.template_version, cache_dir=args.cache_dir,
                             auto_query=args.auto_query, always_save=args.always_save,
                             visualize=not args.no_visualize, visualize_cache_hit=args.visualize_cache_hit,
                             concurrency=args.concurrency, skip_first_prompts=args.skip_first_prompts,
                             num_prompts=args.num_prompts, max_parse_attempts=args.parse_attempts,
                             parse_retry_delay_s=args.parse_retry_delay, img_root=args.img_dir,
                             max_endpoint_failures=args.llm_max_endpoint_failures)
        summary = run_batch(config, make_client, show_progress=not args.quiet)
    except CacheFormatError as error:  # names the file; the user fixes or deletes it
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (LLMConfigError, ValueError, OSError) as error:
        print(f"error: {redact_secrets(' '.join(str(error).split()), secrets)}", file=sys.stderr)
        return 2
    print(f"Summary ({config.cache_path}): {summary.format()}")
    if summary.stopped is not None:
        print(f"error: {summary.stopped}; the replies saved so far are kept, rerun the same command to resume",
              file=sys.stderr)
        return 2
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(run_cli(main, interrupt_hint=INTERRUPT_HINT))
