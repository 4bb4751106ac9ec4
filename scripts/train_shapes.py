"""Train an LVD-Shapes model from nothing: `python scripts/train_shapes.py --family unet3d` (or `--family wan`).

Trains the VAE, then the denoiser and text encoder, on videos drawn by `shapes/world.py`, with a progress bar
showing the losses. A checkpoint is written every few steps to `--checkpoint-dir`; rerunning the same command
after Ctrl-C or a kill resumes from it (same seed, same result). When training is done (or `--max-minutes` is
spent, with `--export-partial`), it writes a diffusers pipeline folder (`--out`, default: the shipped
`shapes/weights/<family>/`, fp16 safetensors) with a model card (README.md, training.json) and a loss curve.
CPU by default (one thread per process: small models run fastest so on a shared machine); CUDA with --device cuda
(the same batches, drawn on the CPU; run once on an H200 through scripts/gpu_train_shapes.sh).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.cli import int_in

# family -> the run-model whose shipped folder it writes
FAMILIES = {"unet3d": "lvd_shapes", "wan": "lvd_wan_shapes"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=tuple(FAMILIES), default="unet3d",
                        help="which backbone family to train: unet3d (lvd_shapes) or wan (lvd_wan_shapes)")
    parser.add_argument("--seed", type=int_in(0), default=0)
    parser.add_argument("--steps", type=int_in(1), default=None, help="denoiser steps (default: TrainConfig's)")
    parser.add_argument("--vae-steps", type=int_in(1), default=None)
    parser.add_argument("--batch-size", type=int_in(1), default=None)
    parser.add_argument("--attention-loss-weight", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None, help="the denoiser's peak learning rate")
    parser.add_argument("--vae-lr", type=float, default=None, help="the VAE's learning rate")
    parser.add_argument("--snr-gamma", type=float, default=None,
                        help="min-SNR-gamma weighting of the UNet's epsilon loss (e.g. 5; default 0 = uniform)")
    parser.add_argument("--denoiser-minutes", type=float, default=None,
                        help="anneal the learning rate over this many minutes of denoiser training and stop there, "
                             "instead of over --steps (a fixed GPU budget; the steps done are recorded)")
    parser.add_argument("--checkpoint-every", type=int_in(1), default=None,
                        help="steps between checkpoints (default: TrainConfig's; raise it on a fast GPU)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this many minutes of this run (checkpointed; rerun to continue)")
    parser.add_argument("--stop-after-step", type=int_in(1), default=None,
                        help="stop once the denoiser has made this many steps (of --steps' schedule); with "
                             "--export-partial it remakes a partly trained export, e.g. the shipped one's 622")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="default: .train_shapes/<family>/ in the repository")
    parser.add_argument("--out", type=Path, default=None, help="pipeline folder to write (default: the shipped one)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="without a checkpoint, continue from an exported folder (e.g. shapes/weights/unet3d: "
                             "its weights and recorded progress; the optimiser state starts afresh)")
    parser.add_argument("--export-partial", action="store_true",
                        help="write the pipeline folder even if training stopped before its last step")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int_in(1), default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--workers", type=int_in(0), default=0,
                        help="processes drawing the training videos (0: this one; the batches are the same): "
                             "keeps a GPU fed")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    from tqdm import tqdm

    from models.registry import get_run_model
    from models.shapes import (build_shapes_unet3d_components, build_shapes_wan_components,
                               save_unet3d_pipeline_folder, save_wan_pipeline_folder)
    from shapes.training import draw_loss_curve, train_config, train_shapes_model, trained_names, write_model_card

    torch.set_num_threads(args.threads)
    overrides = {"steps": args.steps, "vae_steps": args.vae_steps, "batch_size": args.batch_size,
                 "attention_loss_weight": args.attention_loss_weight, "lr": args.lr, "vae_lr": args.vae_lr,
                 "denoiser_minutes": args.denoiser_minutes, "checkpoint_every": args.checkpoint_every,
                 "snr_gamma": args.snr_gamma}
    try:
        config = train_config(args.family, seed=args.seed, **overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parent.parent
    checkpoint_dir = args.checkpoint_dir or repo / ".train_shapes" / args.family
    out = args.out or get_run_model(FAMILIES[args.family]).bundled_folder
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        print(f"error: --device {args.device}: expected cpu, or cuda[:N] on a machine with CUDA "
              f"(torch.cuda.is_available() is {torch.cuda.is_available()})", file=sys.stderr)
        return 2
    wan = args.family == "wan"
    components = (build_shapes_wan_components if wan else build_shapes_unet3d_components)(config.seed)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, step: int, total: int, text: str) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, initial=step - 1, desc=stage, dynamic_ncols=True)
        bar.update(step - bar.n)
        bar.set_postfix_str(text, refresh=False)

    try:
        state = train_shapes_model(components, config, checkpoint_dir,
                             max_seconds=None if args.max_minutes is None else args.max_minutes * 60,
                             progress=progress, init_from=args.init_from, stop_after_step=args.stop_after_step,
                             device=args.device, workers=args.workers)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last checkpoint is in {checkpoint_dir}: rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        for bar in bars.values():
            bar.close()
    if state.stage != "done" and not args.export_partial:
        print(f"stopped at {state.stage} step {state.step} (checkpoint in {checkpoint_dir}); rerun to continue, "
              "or pass --export-partial to write the model as it is")
        return 0
    (save_wan_pipeline_folder if wan else save_unet3d_pipeline_folder)(out, components, dtype=torch.float16)
    draw_loss_curve(out / "loss_curve.png", state.losses)
    num_parameters = {name: sum(p.numel() for p in components[name].parameters())
                      for name in trained_names(components)}
    write_model_card(out, family=args.family, config=config, state=state, num_parameters=num_parameters,
                     device=args.device, threads=args.threads)
    print(f"wrote {out} ({state.stage}, {state.seconds / 60:.1f} min of training)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
