"""Train Bayes-PFL on an auxiliary dataset (official protocol; see utils/training.py).

    python train.py --dataset visa --save_path ./my_exps/train_visa --seed 333
    torchrun --nproc_per_node 2 train.py --dataset visa ...     # DistributedDataParallel
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from tqdm import tqdm

from dataset.registry import REGISTRY
from models.errors import UserError
from utils import distributed as dist_utils
from utils.cli import (WORKERS_HELP, Parser, add_model_arguments, add_runtime_arguments, fail,
                       finite_float, positive_int, seed_int)
from utils.misc import setup_logging
from utils.training import TrainConfig, train

IGNORED = "accepted for compatibility with the official scripts and ignored"
LEARNING_RATE_FLAGS = (
    ("--learning_rate", "accepted for compatibility and has no effect, as in the official code "
                        "(every group sets its own lr; the 'rest' group uses "
                        "--learning_rate_linear)"),
    ("--learning_rate_PFL", "stage 1: names with PFL but neither encoder nor decoder"),
    ("--learning_rate_prompt", "stage 1: the prompt bank"),
    ("--learning_rate_linear", "stage 1: the 'rest' group (encoders, decoders, RCA, class/image "
                               "mapping, fuse); stage 2: class_mapping, image_mapping, fuse "
                               "(no schedule)"),
    ("--temperature_lr", "stage 1: temperature_pixel and temperature_image"),
)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    official = "; ".join(f"training on {name}: {info.validation[0]} "
                         f"{' '.join(info.validation[1])}"
                         for name, info in REGISTRY.items() if info.validation)
    p = Parser(
        description="Train Bayes-PFL (two stages, validated after every epoch). Writes "
                    "epoch_post_{epoch}_{stage}.pth (epochs from 1), best.pth, last.pth "
                    "(resumable) and train.log into --save_path. Several GPUs: torchrun "
                    "--nproc_per_node N train.py ... (DistributedDataParallel).",
        epilog="Randomness: each epoch re-derives its seeds from (--seed, epoch, rank): data "
               "order, augmentation, Monte Carlo draws, and the prompt of each step (drawn "
               "uniformly from the bank with a torch.Generator, the same on every rank); "
               "validation draws its samples from (--seed, epoch). --resume therefore continues "
               "exactly as an uninterrupted run. Optimiser groups follow the official names as "
               "model.named_parameters() lists them (each parameter once, shared encoder under "
               "context_encoder/state_encoder: the 'rest' group).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default=d.dataset, help="auxiliary training dataset (its test split)")
    a("--train_data_path", default=d.train_data_path,
      help="folder holding meta_<dataset>.json and the dataset folder")
    a("--val_data_path", default=d.val_data_path, help="same, for the validation dataset")
    a("--save_path", default=d.save_path, help="output folder")
    a("--pretrained_path", default=d.pretrained_path, help="CLIP weights (OpenAI archive)")
    add_model_arguments(p, from_checkpoint=False)
    for flag, help_text in LEARNING_RATE_FLAGS:
        a(flag, type=finite_float, default=getattr(d, flag[2:]), help=help_text)
    a("--batch_size", type=positive_int, default=d.batch_size,
      help="per process: with torchrun the effective batch is nproc_per_node x batch_size")
    a("--epochs", type=positive_int, default=d.epochs, help="at most this many epochs (both stages)")
    a("--sample_num", type=positive_int, default=d.sample_num, help="Monte Carlo samples in validation")
    a("--seed", type=seed_int, default=d.seed)
    a("--print_freq", type=int, default=d.print_freq,
      help="steps between updates of the running losses on the progress bar")
    a("--save_freq", type=positive_int, default=d.save_freq,
      help="write epoch_post_{epoch}_{stage}.pth every this many epochs")
    for flag in ("--config_path", "--model", "--pretrained", "--alpha"):
        a(flag, default=None, help=IGNORED)
    # Additions to the official flags.
    add_runtime_arguments(p)
    a("--num_workers", type=int, default=d.num_workers,
      help=f"{WORKERS_HELP}; results do not depend on it")
    a("--resume", nargs="?", const="", default=None, metavar="PATH",
      help="continue a run from its resumable state (default PATH: <save_path>/last.pth); "
           "settings that change what is computed must be the saved ones")
    a("--overwrite", action="store_true",
      help="replace the run already in --save_path (its checkpoints and log are deleted "
           "first); without it such a folder is refused")
    a("--val_dataset", default=None,
      help=f"validation dataset. Default, the official cross-dataset choice ({official}); "
           "it selects on target-domain data. Leakage-free alternative: --val_dataset equal to "
           "--dataset with --val_classes A B ..., which removes those classes from the "
           "training data and validates on them")
    a("--val_classes", nargs="+", default=None,
      help="validation classes (default: the official 5, or all classes of --val_dataset)")
    a("--val_batch_size", type=positive_int, default=d.val_batch_size,
      help="validation batch (the Monte Carlo samples, hence the figures, do not depend on it)")
    a("--patience", type=int, default=d.patience,
      help="official counter: stage 1 switches (stage 2 stops) at the (patience + 1)-th "
           "consecutive epoch without improvement, i.e. the 4th with the official 3")
    a("--stop_after", type=positive_int, default=None,
      help="stop after this epoch, resumably (e.g. for time-limited jobs)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f for f in TrainConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["verify_weights"] = not args.no_verify
    if values["resume"] == "":
        values["resume"] = os.path.join(args.save_path, "last.pth")
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_process = dist_utils.env_info().is_main
    setup_logging(None, level=logging.INFO if main_process else logging.WARNING)
    try:
        config = config_from_args(args)
        result = train(config, progress=tqdm if main_process else None)
    except UserError as error:
        return fail(str(error), 2)
    except KeyboardInterrupt:
        print(f"interrupted; {os.path.join(args.save_path, 'last.pth')} holds the last finished "
              f"epoch (continue with --resume)", file=sys.stderr)
        return 130
    finally:
        dist_utils.cleanup()
    if main_process:
        def figure(value):
            return "-" if value is None else f"{value:.4f}"

        logging.getLogger("bayes_pfl").info(
            f"done after {result.epochs_run} epochs: best pixel AP {figure(result.best_pixel_ap)}"
            f" (stage 1), best image AP {figure(result.best_image_ap)} (stage 2); best "
            f"parameters: {result.best_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
