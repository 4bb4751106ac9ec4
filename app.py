"""LVD Studio: a browser page to plan a layout with an LLM, edit its boxes and generate the guided video
beside its baseline (see README, "Studio"). Needs the app extra: ``bash scripts/setup.sh --app``.

Example (tiny random-weight models on a CPU; their videos are noise)::

    python app.py                      # http://127.0.0.1:7860
    python app.py --host 0.0.0.0 --port 8080 --device cuda:1
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Before Gradio is imported: no telemetry, no version check (the page must work offline).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from studio import backend  # noqa: E402  (after the environment is set)
from utils.cli import OutputDirError, ensure_writable_dir, int_in  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int_in(1, 65535), default=7860)
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link (needs internet)")
    parser.add_argument("--cache-dir", type=Path, default=Path("cache"),
                        help="folder of the layout caches offered under 'Cache file' (the studio writes its own there)")
    parser.add_argument("--output-dir", type=Path, default=Path("img_generations"),
                        help="results go to <output-dir>/studio/run<k>/")
    parser.add_argument("--model", default="gpt-4-1106-preview",
                        help="LLM name for 'LLM endpoint' (as for prompt_batch.py)")
    parser.add_argument("--template_version", default=backend.DEFAULT_TEMPLATE_VERSION)
    parser.add_argument("--run-model", default=None, choices=[spec.name for spec in backend.RUN_MODELS],
                        metavar="RUN_MODEL",
                        help="the run-model the page opens on (default: lvd_shapes, the shipped trained model, when "
                             "no real weights are found)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: automatic)")
    parser.add_argument("--threads", type=int_in(1), default=None,
                        help="torch CPU threads (default: generate.py's: $OMP_NUM_THREADS if set, else 1 for the tiny "
                             "run-models, else one per core)")
    parser.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"),
                        help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--model-path", action="append", default=[], metavar="RUN_MODEL=DIR",
                        help="local weights folder of a run-model, e.g. lvd_zeroscope=/data/zeroscope (repeatable)")
    parser.add_argument("--verbose", action="store_true")
    backend.add_llm_arguments(parser)
    return parser


def parse_model_paths(items: list[str]) -> dict[str, str]:
    paths = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--model-path expects RUN_MODEL=DIR, found {item!r}")
        backend.get_spec(name)  # an unknown run-model name fails here, listing the choices
        paths[name] = folder
    return paths


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse's usage errors (exit 2) and --help (0) as return codes
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:  # every flag is checked here, before Gradio and the models are imported
        ensure_writable_dir(args.output_dir, "--output-dir")
        if args.device is not None:  # else a bad device is seen only at the first generation, in the page
            from models.devices import resolve_device

            resolve_device(args.device)
        settings = backend.StudioSettings(cache_dir=args.cache_dir, output_dir=args.output_dir,
                                          template_version=args.template_version, llm=backend.build_llm_settings(args),
                                          device=args.device, dtype=args.dtype,
                                          model_paths=parse_model_paths(args.model_path), threads=args.threads,
                                          opening_run_model=args.run_model)
    except (ValueError, OutputDirError, backend.StudioError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        from studio import ui
    except ImportError as error:
        print(f"error: the studio needs the app extra ({error}); install it with `bash scripts/setup.sh --app`",
              file=sys.stderr)
        return 2
    app = ui.build_app(settings)
    app.queue(default_concurrency_limit=4)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, **ui.launch_kwargs(settings, app.studio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
