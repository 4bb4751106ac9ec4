"""Held-out epsilon loss of trained shapes UNets, per timestep: `python scripts/shapes_loss.py FOLDER [FOLDER ...]`.

Every folder is scored on the same held-out videos, timesteps and noise (`shapes.training.held_out_epsilon_loss`),
so the rows pair: a recipe change that fits the data better shows here long before it shows in sampled videos,
whose measures (`scripts/bench_shapes.py`) vary by a video or two at twenty prompts. High timesteps are where a
video's layout and objects are decided; the lowest, its last details. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.cli import int_in  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="pipeline folders written by train_shapes.py "
                                                               "(--family unet3d), e.g. shapes/weights/unet3d")
    parser.add_argument("--videos", type=int_in(1), default=32, help="held-out videos (a multiple of 4)")
    parser.add_argument("--threads", type=int_in(1), default=1)
    args = parser.parse_args(argv)

    import torch

    from models.hub import MissingWeightsError
    from models.video_model import load_components_from_folder
    from shapes.training import HELD_OUT_TIMESTEPS, held_out_epsilon_loss

    torch.set_num_threads(args.threads)
    print("| model | " + " | ".join(f"t={t}" for t in HELD_OUT_TIMESTEPS) + " | mean |")
    print("|---" * (len(HELD_OUT_TIMESTEPS) + 2) + "|")
    for folder in args.folders:
        try:
            components = load_components_from_folder(folder, torch.float32)
        except MissingWeightsError as exc:
            print(f"error: {exc}\nexpected a folder written by `python scripts/train_shapes.py --family unet3d` "
                  "(the Wan family trains by flow matching)", file=sys.stderr)
            return 2
        losses = held_out_epsilon_loss(components, num_videos=args.videos)
        mean = sum(losses.values()) / len(losses)
        print(f"| {folder} | " + " | ".join(f"{losses[t]:.4f}" for t in HELD_OUT_TIMESTEPS) + f" | {mean:.4f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
