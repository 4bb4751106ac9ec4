"""How much of a latent edit made before a denoising step survives the step, on Wan's UniPC sampler.

LVD edits the latents x_i before the model call of step i (guidance). UniPC's corrector then rebuilds x_i from
the previous sample x_{i-1} and the new model output, which undoes most of the edit. For each guided step this
runs the step twice from the same solver state, on x_i and on the edited x_i + d (d: the real LVD update of that
step), and reports the share of the edit still in the next latents:

    survival_i = <x'_{i+1} - x_{i+1}, d> / <d, d>        (1: the edit is kept; 0: it is erased)

for the stock sampler (corrector on every step) and for UniPC with its corrector off on the guided steps
(``corrector_off_steps = max_index_step``). The trajectory itself follows the edited latents, as LVD does. Last, the
whole effect: how far the guided video's final latents end from the same sampler's unguided ones.

    python scripts/measure_edit_survival.py --json-out docs/bench/wan_edit_survival_tiny_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import torch


def load_sibling_script(name: str):
    """Another script of this folder as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_edit_survival(model, sampling, condition, guidance, execution, seed: int = 0) -> list[dict]:
    """Per guided step: (step, sigma, survival, edit norm) on ``model``'s sampler, following the edited run."""
    from generation.backbones import backbone_for
    from generation.loop import Step
    from generation.lvd import build_layout_guidance

    backbone = backbone_for(model)
    scheduler = backbone.make_scheduler()
    text = backbone.encode_text([condition.prompt], sampling.negative_prompt)
    latents = backbone.prepare_latents(seed, sampling.num_frames, sampling.height, sampling.width,
                                       sampling.initial_noise)
    scheduler.set_timesteps(sampling.num_inference_steps, device=backbone.device)
    timesteps = scheduler.timesteps
    hook = build_layout_guidance(backbone, [condition.prompt], [condition], text.cond, guidance, execution, scheduler,
                                 timesteps, sampling.num_frames, sampling.height, sampling.width)
    rows = []
    with hook:
        for index, timestep in enumerate(timesteps[:guidance.max_index_step]):
            edited = hook.before_step(Step(index, timestep, len(timesteps)), latents)
            edit = (edited - latents).double()
            with torch.no_grad():
                outputs = {}
                for name, start in (("plain", latents), ("edited", edited)):
                    trial = copy.deepcopy(scheduler) if name == "plain" else scheduler
                    output = backbone.predict(trial, start, timestep, text, sampling.guidance_scale)
                    outputs[name] = backbone.step(trial, output, timestep, start)
            change = (outputs["edited"] - outputs["plain"]).double()
            norm = float((edit * edit).sum())
            rows.append({"step": index, "sigma": float(scheduler.sigmas[index]),
                         "edit_norm": norm ** 0.5,
                         "survival": float((change * edit).sum() / norm) if norm > 0 else float("nan")})
            latents = outputs["edited"]
    return rows


def run(args) -> dict:
    from generation.backbones import backbone_for
    from generation.config import ExecutionConfig, GuidanceConfig, sampling_config_for
    from generation.sampling import generate_video
    from models.loading import load_video_model
    from models.registry import get_run_model
    from utils.layout import parse_layout

    bench = load_sibling_script("bench_guidance")  # its two-object benchmark layout
    BENCH_PROMPT, BENCH_REPLY = bench.BENCH_PROMPT, bench.BENCH_REPLY
    spec = get_run_model(args.run_model)
    model = load_video_model(spec, device=args.device)
    sampling = sampling_config_for(spec, num_inference_steps=args.num_inference_steps)
    condition = backbone_for(model).build_condition(parse_layout(BENCH_REPLY, BENCH_PROMPT), sampling.num_frames)
    # Every guided iteration runs (threshold never reached); a large loss_scale makes the edit visible on random
    # weights, whose attention is nearly uniform over the 512 text keys.
    guidance = GuidanceConfig(guided_layers=spec.guided_layers, loss_threshold=-1.0, max_iter=1,
                              max_index_step=args.max_index_step, loss_scale=args.loss_scale)
    results = {}
    for name, steps in (("stock UniPC (corrector on every step)", 0),
                        ("UniPC, corrector off on the guided steps", args.max_index_step)):
        arm = model.with_corrector_off_steps(steps)
        rows = measure_edit_survival(arm, sampling, condition, guidance, ExecutionConfig(), seed=args.seed)
        # The whole effect: how far guidance moves the final latents from the same arm's unguided ones.
        arm_sampling = dataclasses.replace(sampling, corrector_off_steps=steps)
        guided = generate_video(model, condition.prompt, arm_sampling, args.seed, condition=condition,
                                guidance=guidance)
        unguided = generate_video(model, condition.prompt, arm_sampling, args.seed)
        change = float((guided.latents - unguided.latents).norm() / unguided.latents.norm())
        results[name] = {"corrector_off_steps": steps, "steps": rows, "final_latent_change": change}
    return {"run_model": spec.name, "num_inference_steps": sampling.num_inference_steps,
            "guidance": dataclasses.asdict(guidance), "results": results}


def format_table(report: dict) -> str:
    names = list(report["results"])
    lines = ["| step | sigma | " + " | ".join(f"survival, {n}" for n in names) + " |",
             "|---:|---:|" + "---:|" * len(names)]
    first = report["results"][names[0]]["steps"]
    for row_index, row in enumerate(first):
        values = [report["results"][n]["steps"][row_index]["survival"] for n in names]
        lines.append(f"| {row['step']} | {row['sigma']:.3f} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    changes = [report["results"][n]["final_latent_change"] for n in names]
    lines.append("| final latents, \\|guided - unguided\\| / \\|unguided\\| | | "
                 + " | ".join(f"{v:.4f}" for v in changes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run-model", default="lvd_wan_tiny")
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--max_index_step", type=int, default=10)
    parser.add_argument("--loss_scale", type=float, default=5000.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.json_out:
        from utils.io import atomic_write_json

        atomic_write_json(args.json_out, {"command": " ".join(["python", "scripts/measure_edit_survival.py"]
                                                              + (argv if argv is not None else sys.argv[1:])),
                                          **json.loads(json.dumps(report))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
