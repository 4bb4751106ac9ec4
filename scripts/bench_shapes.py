"""Baseline vs LVD on the shapes benchmark, one command: `python scripts/bench_shapes.py --family unet3d`.

For each arm (baseline, LVD with the paper's defaults, LVD with a tuned preset; on request the other layout
control families, attention masking and modulation, alone and combined with tuned LVD) it generates the first
``--per-task`` prompts of each of the five tasks of ``--prompt-type shapes`` with generate.py (seed = prompt
index, as the benchmark does), evaluates the run with ``scripts/eval_owl_vit.py --detector shapes`` (five-task
accuracy), and measures, the same way for every arm, prompt following (every requested (colour, shape)
detected in at least half of the frames where the planned layout has it; "main object right" counts only each
frame's largest detections, as many as the plan has objects, which a cluttered video does not pass by chance; for
one-object prompts also the main object's colour alone and shape alone: what a missed prompt misses) and
adherence to the planned layout (mIoU, coverage, CD, AP50 over all frames; `shapes.measure`), and, colour-blind,
the mIoU of the largest salient blob against the box of one-object prompts (it sees where a partly trained model
put *something*).
The ``reconstruction`` arm generates nothing: it passes each prompt's planned scene, drawn by the shapes world,
through the model's VAE, and measures that the same way; no sampler over those latents can do better, so it
tells a denoiser's limits from its VAE's. It prints a markdown table (and writes it with the raw figures, per
video too, as JSON); wall time is each arm's mean seconds per video (video_<r>.json) relative to the baseline's,
in this one run. Rerun on the same ``--out``, it generates nothing new and measures again.

``--compare A B`` compares two such runs (two models, or two methods, on the same prompts and seeds) prompt by
prompt: per arm and measure, the means, the paired difference B - A and its standard error over the prompts;
a difference within two standard errors is noise at this many prompts.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from utils.cli import int_in
from utils.io import atomic_write_json, atomic_write_text

FAMILIES = {"unet3d": ("baseline_shapes", "lvd_shapes"), "wan": ("wan_shapes", "lvd_wan_shapes")}
PROMPTS_PER_TASK = 20          # --prompt-type shapes: 20 prompts per task, task by task
TASKS = ("numeracy", "attribution", "visibility", "dynamic_spatial", "sequential")
# Stands, in an arm's flags, for the family's tuned preset (generation.config.shapes_preset: every guided
# iteration runs, with the family's stronger step).
TUNED = "<tuned>"
# Arms: (name, run-model index in FAMILIES (0 baseline, 1 LVD), extra generate.py flags).
PRESETS = {
    "baseline": (0, []),
    "lvd": (1, []),
    "lvd-tuned": (1, [TUNED]),
    # The other layout control families (README "Layout control families"), alone and under tuned energy.
    "mask": (1, ["--control", "mask"]),
    "modulate": (1, ["--control", "modulate"]),
    "mask+lvd-tuned": (1, ["--control", "mask", "energy", TUNED]),
    "modulate+lvd-tuned": (1, ["--control", "modulate", "energy", TUNED]),
}
RECONSTRUCTION = "reconstruction"   # the planned scenes through the VAE (no generation, no five-task verdicts)
DEFAULT_ARMS = ("baseline", "lvd", "lvd-tuned")
# --compare: (measure, per-video key, one-object prompts only).
COMPARED = (("single-object prompt following", "followed", True), ("all-prompt following", "followed", False),
            ("single-object main object right", "main", True),
            ("single-object main object's colour", "main_colour", True),
            ("single-object main object's shape", "main_shape", True), ("all-prompt main objects right", "main", False),
            ("five-task accuracy", "task_success", False), ("mIoU", "miou", False),
            ("salient mIoU (1 object)", "salient_miou", True))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=tuple(FAMILIES), default="unet3d")
    parser.add_argument("--per-task", type=int_in(1, PROMPTS_PER_TASK), default=8, help="prompts per task (<= 20)")
    parser.add_argument("--arms", nargs="+", choices=(*PRESETS, RECONSTRUCTION), default=list(DEFAULT_ARMS),
                        help=f"default: {' '.join(DEFAULT_ARMS)}")
    parser.add_argument("--out", type=Path, default=Path("bench_shapes"), help="runs and results go here")
    parser.add_argument("--model-path", default=None, help="another trained folder instead of the shipped one")
    parser.add_argument("--threads", type=int_in(1), default=None, help="passed to torch via OMP_NUM_THREADS")
    parser.add_argument("--flags", type=shlex.split, default=[],
                        help="more generate.py flags for every generated arm, after the arm's own (a sweep: e.g. "
                             "--arms lvd-tuned --flags '--guided-blocks 1 2'); give each setting its own --out")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), default=None,
                        help="compare two earlier runs (their --out folders) prompt by prompt; runs nothing")
    return parser.parse_args(argv)


def run(command: list[str], env_threads: int | None) -> None:
    import os

    env = dict(os.environ)
    if env_threads is not None:
        env["OMP_NUM_THREADS"] = str(env_threads)
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, env=env)


def arm_flags(arm: str, family: str) -> list[str]:
    """The arm's generate.py flags, the family's tuned preset in place of ``TUNED``."""
    from generation.config import shapes_preset

    preset = shapes_preset(family)
    tuned = ["--loss_scale", f"{preset.loss_scale:g}", "--loss_threshold", f"{preset.loss_threshold:g}"]
    return [part for flag in PRESETS[arm][1] for part in (tuned if flag == TUNED else [flag])]


def generate_arm(arm: str, run_model: str, flags: list[str], args) -> Path:
    root = args.out / arm
    for task_index in range(len(TASKS)):
        command = [sys.executable, "generate.py", "--run-model", run_model, "--prompt-type", "shapes",
                   "--model", "rule-based", "--template_version", "v0.1", "--output-dir", str(root),
                   "--force_run_ind", "0", "--seed_offset", "0", "--skip_first_prompts",
                   str(task_index * PROMPTS_PER_TASK), "--num_prompts", str(args.per_task), *flags, *args.flags]
        if args.model_path:
            command += ["--model-path", args.model_path]
        run(command, args.threads)
    runs = sorted(root.glob("imgs_*/run0"))
    if len(runs) != 1:
        raise RuntimeError(f"expected one run folder under {root}, found {runs}")
    return runs[0]


def reconstruct_arm(args) -> Path:
    """The first ``per_task`` prompts of each task, planned, drawn (seed = prompt index) and passed through the
    VAE of the model under test, saved where a generated run would put them."""
    import numpy as np
    from diffusers import AutoencoderKL, AutoencoderKLWan

    from models.registry import SHAPES_WAN_NUM_FRAMES, get_run_model
    from prompt import get_prompt_entries
    from shapes.measure import reconstruct_video
    from shapes.planner import plan_scene
    from shapes.world import NUM_FRAMES, render_video
    from utils.video_io import write_joblib

    wan = args.family == "wan"
    folder = Path(args.model_path or get_run_model(FAMILIES[args.family][1]).bundled_folder)
    vae = (AutoencoderKLWan if wan else AutoencoderKL).from_pretrained(folder / "vae").eval()
    entries = get_prompt_entries("shapes")
    run_dir = args.out / RECONSTRUCTION / "run0"
    for task_index in range(len(TASKS)):
        for index in range(task_index * PROMPTS_PER_TASK, task_index * PROMPTS_PER_TASK + args.per_task):
            scene = plan_scene(entries[index][0])
            frames = render_video(scene, num_frames=SHAPES_WAN_NUM_FRAMES if wan else NUM_FRAMES,
                                  rng=np.random.default_rng(index))
            started = time.perf_counter()
            video = reconstruct_video(vae, frames)
            (run_dir / str(index)).mkdir(parents=True, exist_ok=True)
            write_joblib(video, run_dir / str(index) / "video_0.joblib")
            atomic_write_json(run_dir / str(index) / "video_0.json",
                              {"elapsed_s": round(time.perf_counter() - started, 3)})
    return run_dir


def evaluate_arm(run_dir: Path, args) -> dict:
    eval_path = run_dir / "eval.json"
    run([sys.executable, "scripts/eval_owl_vit.py", "--run_base_path", str(run_dir), "--prompt-type", "shapes",
         "--detector", "shapes", "--save-eval", "--save-eval-path", str(eval_path)], args.threads)
    return json.loads(eval_path.read_text())


def measure_videos(run_dir: Path) -> dict:
    """Prompt following and layout adherence of every video of a run, against the planned scene of its prompt
    (shapes.measure, all frames): the same measurement for every arm, baselines included (which have no
    layout of their own)."""
    from prompt import get_prompt_entries
    from shapes.measure import compute_salient_miou, detect_video, follows_prompt, main_colour, score_video_adherence
    from shapes.planner import plan_scene
    from utils.eval.metrics import summarize_adherence
    from utils.video_io import load_video

    entries = get_prompt_entries("shapes")
    single = {"followed": 0, "total": 0, "main": 0, "main_colour": 0, "main_shape": 0}
    every = {"followed": 0, "total": 0, "main": 0}
    adherence, salient, per_video = [], [], []
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        video_path = folder / "video_0.joblib"
        if not video_path.is_file():
            continue
        scene = plan_scene(entries[int(folder.name)][0])
        frames = load_video(video_path)
        detections = detect_video(frames)
        one_object = len(scene.objects) == 1
        found = {"followed": follows_prompt(scene, detections), "main": follows_prompt(scene, detections, main=True)}
        if one_object:  # what the main object gets wrong, when it is not the requested one: colour or shape
            found["main_colour"] = follows_prompt(scene, detections, main=True, shape=False)
            found["main_shape"] = follows_prompt(scene, detections, main=True, colour=False)
            found["colour_asked"], found["colour_drawn"] = scene.objects[0].colour, main_colour(scene, detections)
        for tally in (every, single) if one_object else (every,):
            tally["total"] += 1
            for key in tally.keys() - {"total"}:
                tally[key] += found[key]
        adherence.append(score_video_adherence(scene, detections, *frames.shape[1:3]).to_dict())
        if one_object:
            salient.append(compute_salient_miou(scene, frames))
        per_video.append({"index": int(folder.name), "objects": len(scene.objects), **found,
                          "miou": adherence[-1]["miou"], "salient_miou": salient[-1] if one_object else None})
    return {"prompt_following": {"single_object": single, "all": every},
            "adherence": summarize_adherence(adherence),
            "salient_miou_single_object": sum(salient) / len(salient) if salient else None,
            "per_video": per_video}


def compare_results(a: dict, b: dict) -> list[dict]:
    """Paired differences B - A, per arm in both and measure of `COMPARED`, over the prompts both measured
    (results.json of two runs): the means, the difference, its standard error (of the per-prompt
    differences), and whether it is within two of them."""
    from shapes.measure import paired_difference

    rows = []
    for arm in (arm for arm in a["results"] if arm in b["results"]):
        videos = []
        for side in (a, b):
            if "per_video" not in side["results"][arm]:
                raise ValueError(f"arm {arm!r} of one run has no per-video figures (run before they were recorded); "
                                 "rerun bench_shapes.py with the same --out and arms: it generates nothing new")
            videos.append({v["index"]: v for v in side["results"][arm]["per_video"]})
        for measure, key, single_only in COMPARED:
            pairs = [(float(videos[0][i][key]), float(videos[1][i][key])) for i in sorted(videos[0].keys() & videos[1])
                     if videos[0][i].get(key) is not None and videos[1][i].get(key) is not None
                     and (videos[0][i]["objects"] == 1 or not single_only)]
            if not pairs:
                continue
            n = len(pairs)
            mean, se = paired_difference([x for x, _ in pairs], [y for _, y in pairs])
            rows.append({"arm": arm, "measure": measure, "videos": n, "a": sum(x for x, _ in pairs) / n,
                         "b": sum(y for _, y in pairs) / n, "difference": mean, "se": se,
                         "within_noise": bool(abs(mean) <= 2 * se)})
    return rows


def compare_runs(folder_a: Path, folder_b: Path) -> str:
    """`compare_results` of two --out folders as a markdown table."""
    loaded = []
    for folder in (folder_a, folder_b):
        path = folder / "results.json" if folder.is_dir() else folder
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: expected a bench_shapes.py --out folder (or its results.json)")
        loaded.append(json.loads(path.read_text()))
    if loaded[0]["family"] != loaded[1]["family"]:
        raise ValueError(f"the runs are of different families: {loaded[0]['family']} and {loaded[1]['family']}")
    rows = compare_results(*loaded)
    if not rows:
        raise ValueError("the two runs share no arm with measured videos")
    lines = [f"B = {folder_b}, A = {folder_a}: paired over the prompts both ran (seed = prompt index); "
             "within noise: |B - A| <= 2 standard errors.", "",
             "| arm | measure | videos | A | B | B - A | SE | within noise |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['measure']} | {r['videos']} | {r['a']:.3f} | {r['b']:.3f} | "
                     f"{r['difference']:+.3f} | {r['se']:.3f} | {'yes' if r['within_noise'] else 'no'} |")
    return "\n".join(lines)


def mean_seconds_per_video(run_dir: Path) -> float:
    times = [json.loads(p.read_text())["elapsed_s"] for p in run_dir.glob("*/video_0.json")]
    return sum(times) / max(len(times), 1)


def colour_confusion(per_video: list[dict]) -> str:
    """"green: yellow 4, green 3; red: red 4" over a run's one-object videos (`shapes.measure.main_colour`)."""
    pairs = Counter((v["colour_asked"], v["colour_drawn"]) for v in per_video if v.get("colour_asked"))
    parts = []
    for asked in sorted({a for a, _ in pairs}):
        drawn = sorted(((n, d) for (a, d), n in pairs.items() if a == asked), key=lambda nd: (-nd[0], nd[1]))
        parts.append(f"{asked}: " + ", ".join(f"{d} {n}" for n, d in drawn))
    return "; ".join(parts) or "-"


def rate(part: dict, key: str = "followed") -> float:
    return part[key] / part["total"] if part["total"] else float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compare:
        print(compare_runs(*args.compare))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {}
    for arm in args.arms:
        if arm == RECONSTRUCTION:
            run_dir = reconstruct_arm(args)
            results[arm] = {"run": str(run_dir), "flags": [], "seconds_per_video": mean_seconds_per_video(run_dir),
                            **measure_videos(run_dir), "tasks": {}, "overall": None}
            continue
        model_index, flags = PRESETS[arm][0], arm_flags(arm, args.family)
        run_dir = generate_arm(arm, FAMILIES[args.family][model_index], flags, args)
        summary = evaluate_arm(run_dir, args)
        measured = measure_videos(run_dir)
        verdicts = {v["index"]: v["success"] for v in summary["videos"] if not v.get("skipped")}
        for video in measured["per_video"]:
            video["task_success"] = verdicts.get(video["index"])
        results[arm] = {"run": str(run_dir), "flags": [*flags, *args.flags],
                        "seconds_per_video": mean_seconds_per_video(run_dir),
                        **measured, "tasks": summary["tasks"], "overall": summary["overall"]}
    base_time = results.get("baseline", {}).get("seconds_per_video")
    header = ["arm", "single-object prompt following", "main object right", "its colour", "its shape", "all prompts",
              "all: main objects right", *TASKS, "overall",
              "mIoU", "coverage", "CD", "AP50", "salient mIoU (1 object)", "s/video", "time vs baseline"]
    lines = [f"Shapes benchmark, {args.family}, first {args.per_task} prompts of each task (seed = prompt index).",
             "",
             "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for arm, r in results.items():
        tasks = [f"{r['tasks'][t]['correct']}/{r['tasks'][t]['total']}" if t in r["tasks"] else "-" for t in TASKS]
        adherence = r["adherence"]
        following = r["prompt_following"]
        cells = [arm, *(f"{rate(following['single_object'], key):.2f}"
                        for key in ("followed", "main", "main_colour", "main_shape")),
                 *(f"{rate(following['all'], key):.2f}" for key in ("followed", "main")),
                 *tasks, f"{r['overall']['correct']}/{r['overall']['total']}" if r["overall"] else "-",
                 *("-" if adherence.get(k) is None else f"{adherence[k]:.3f}"
                   for k in ("miou", "coverage", "centroid_distance", "ap50")),
                 "-" if r["salient_miou_single_object"] is None else f"{r['salient_miou_single_object']:.3f}",
                 f"{r['seconds_per_video']:.1f}",
                 f"{r['seconds_per_video'] / base_time:.2f}x" if base_time else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The main object's colour in one-object videos, asked: drawn (videos):", ""]
    for arm, r in results.items():
        lines.append(f"- {arm}: {colour_confusion(r['per_video'])}")
    table = "\n".join(lines)
    print(table)
    atomic_write_json(args.out / "results.json", {"family": args.family, "per_task": args.per_task,
                                                  "results": results, "table": table,
                                                  "wall_s": round(time.perf_counter() - started, 1)})
    atomic_write_text(args.out / "results.md", table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
