"""The whole Bayes-PFL method on a laptop, in a few minutes, without downloads.

    python demo.py                # about 3 minutes on 2 CPU cores

1. generates a synthetic MVTec-style dataset (textures and objects with scratches, cracks,
   holes, stains and missing parts, with exact masks);
2. builds a small CLIP with RANDOM weights: pretrained CLIP weights cannot be bundled with
   the project, so this exercises and shows the method, not its real accuracy (for that, see
   test.sh with OpenAI's ViT-L/14-336 and the released checkpoints);
3. trains Bayes-PFL (stage 1: the prompt flows, the prompts and RCA, with the official losses,
   flows and schedule) on five categories, validating on new images of one of them;
4. evaluates zero-shot on categories never seen in training or selection: the per-class
   table (test.py's) as mean ± std over three sampling seeds (the image tower runs once for
   all three), CSV/JSON and pictures under demo_output/;
5. evaluates the same categories 4-shot: 4 good train images of each category (never its test
   images) as references (test.py --k_shot 4), mean ± std over three shot seeds, and prints
   the two mean rows side by side.

The demo-only settings (utils/demo.py says why each differs from train.py's defaults): cached
frozen CLIP outputs (no augmentation), the "rest" parameter group at 5e-3, 224 px, batch 8, a
random CLIP of width 256 with 12 vision blocks (layers 3 6 9 12), 30 epochs with a patience
as long as the training (stage 1 throughout), and the mean of the parameters after each of
the last 15 epochs as the model evaluated (kept as demo_output/train/final.pth). With a
random text tower the image-level text score stays near chance; the anomaly maps are what
learns here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch
from tabulate import tabulate
from tqdm import tqdm

from models import AnomalyDetector, load_clip
from models.checkpoint import save_checkpoint
from models.errors import SettingsError, UserError
from utils import demo
from utils.cli import Parser, fail, seed_int
from utils.misc import set_seed, setup_logging
from utils.provenance import data_record, provenance
from utils.results import make_output_folder, write_runs, write_text
from utils.training.config import model_spec


def get_parser() -> argparse.ArgumentParser:
    p = Parser(description="Bayes-PFL demo on synthetic data with a random "
                           "CLIP (CPU, a few minutes)")
    p.add_argument("--out", default="./demo_output", help="everything the demo writes")
    p.add_argument("--epochs", type=int, default=demo.EPOCHS)
    p.add_argument("--patience", type=int, default=None,
                   help="epochs without improvement before the stage switch / stop "
                        "(default: as many as --epochs, stage 1 throughout; official: 3)")
    p.add_argument("--seed", type=seed_int, default=333)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--n_anomalous", type=int, default=24,
                   help="anomalous images per category (good ones: half as many)")
    p.add_argument("--eval_seeds", type=int, default=3,
                   help="sampling seeds of the evaluation (--seed, --seed + 1, ...): the table "
                        "reads mean ± std over them")
    p.add_argument("--no_vis", action="store_true", help="skip the pictures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


DEMO_MARKER = ".bayes-pfl-demo"           # in --out: the folders below were written by the demo
DEMO_FOLDERS = ("data", "train", "results")


def check_args(args: argparse.Namespace) -> None:
    """Every setting checked before any work."""
    for name, least in (("epochs", 1), ("n_anomalous", 1), ("patience", 0), ("eval_seeds", 1)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise SettingsError(f"--{name} must be at least {least}, not {getattr(args, name)}")


def claim_output(out: str) -> None:
    """Make ``out`` the demo's: the folders it writes (data, train, results) are replaced only
    when an earlier demo run wrote them (its marker file is there); anything else is refused."""
    ours = os.path.isfile(os.path.join(out, DEMO_MARKER))
    present = [f for f in DEMO_FOLDERS if os.path.exists(os.path.join(out, f))]
    if present and not ours:
        raise SettingsError(f"--out {out} already holds {', '.join(present)} that the demo did not "
                            f"write: choose another --out (the demo replaces only its own files)")
    make_output_folder(out, "--out")
    write_text(os.path.join(out, DEMO_MARKER), "written by demo.py: data/, train/ and results/ "
                                                "are replaced by the next demo run\n")
    for folder in present:
        shutil.rmtree(os.path.join(out, folder))


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    out = os.path.abspath(args.out)
    try:
        check_args(args)
        claim_output(out)
        return run(args, out)
    except UserError as error:
        return fail(str(error), 2)


def run(args: argparse.Namespace, out: str) -> int:
    start = time.time()
    logger = setup_logging(os.path.join(out, "demo.log"))
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    set_seed(args.seed)

    data = os.path.join(out, "data")
    logger.info("1/5 synthetic data: train %s | select %s | unseen %s", demo.TRAIN_CLASSES,
                demo.VAL_CLASSES, demo.UNSEEN_CLASSES)
    demo.make_data(data, args.seed, args.n_anomalous)

    logger.info("2/5 a CLIP with RANDOM weights (width %d, %d blocks, patch %d, %d px): no "
                "pretrained weights can be bundled, so this shows the method, not its accuracy",
                demo.GEOMETRY["vision_width"], demo.GEOMETRY["vision_layers"],
                demo.GEOMETRY["patch"], demo.IMAGE_SIZE)
    clip_path = demo.make_clip(os.path.join(out, "clip_random.pt"), args.seed)

    logger.info("3/5 training Bayes-PFL on %s (%d epochs)", ", ".join(demo.TRAIN_CLASSES),
                args.epochs)
    config = demo.train_config(data, clip_path, os.path.join(out, "train"), args.seed,
                               args.device, args.epochs, args.patience)
    result = demo.train_averaged(config, progress=None if args.quiet else tqdm)
    for name in ("last.pth", "best.pth"):             # kept: final.pth (evaluated), train.log
        path = os.path.join(out, "train", name)
        if os.path.exists(path):
            os.remove(path)
    logger.info("training: %d epochs, stage switch after epoch %s, best validation pixel AP "
                "%s (epoch %s); the mean of the parameters after each of the last %d epochs is "
                "evaluated", result.epochs_run, result.switch_epoch,
                _fmt(result.best_pixel_ap), result.best_epoch.get(1), demo.AVERAGE_LAST)

    logger.info("4/5 zero-shot evaluation on unseen categories: %s",
                ", ".join(demo.UNSEEN_CLASSES))
    clip = load_clip(clip_path, image_size=demo.IMAGE_SIZE, device=args.device)
    model = result.model.eval()
    seeds = [args.seed + k for k in range(args.eval_seeds)]
    settings = {"demo": vars(args), "stage": result.final_stage, "seeds": seeds}
    record = provenance(settings, clip_path, data=[data_record(data, "demo_eval")],
                        device=args.device, started=start)
    save_checkpoint(model, os.path.join(out, "train", "final.pth"), result.final_stage,
                    model_spec(config, clip), {"provenance": record})
    detector = AnomalyDetector(clip, model, image_size=demo.IMAGE_SIZE, sample_num=10,
                               stage=result.final_stage, layers=demo.LAYERS)
    set_seed(args.seed)
    dataset, loader = demo.eval_data(data, args.seed)
    results = os.path.join(out, "results")
    make_output_folder(results, "--out")        # its pictures are never read as inputs
    vis = None if args.no_vis else os.path.join(results, "imgs")
    runs = demo.zero_shot_runs(detector, loader, seeds, vis, progress=not args.quiet)
    tables, mean, mean_std = write_runs(runs, results, "demo_eval", settings,
                                        {"provenance": record})
    print("\nZero-shot results on categories never seen in training (random-weight CLIP; "
          f"values in %, mean ± std over the sampling seeds {' '.join(map(str, seeds))}):")
    print(tables[None])

    logger.info("5/5 %d-shot evaluation on the same categories: %d good train images of each "
                "as references, shot seeds %s", demo.K_SHOT, demo.K_SHOT, demo.SHOT_SEEDS)
    shot_runs, drawn = demo.few_shot_runs(detector, dataset, loader, data, args.seed,
                                          progress=not args.quiet)
    shot_dir = os.path.join(results, f"{demo.K_SHOT}shot")
    shot_settings = {**settings, "seeds": [args.seed], "k_shot": demo.K_SHOT,
                     "shot_seeds": demo.SHOT_SEEDS}
    references = {"k_shot": demo.K_SHOT, "from": "the train split",
                  "paths": {str(shot): per_class for shot, per_class in drawn.items()}}
    shot_tables, shot_mean, shot_std = write_runs(
        shot_runs, shot_dir, "demo_eval", shot_settings,
        {"shot_seeds": demo.SHOT_SEEDS, "references": references, "provenance": record})
    k = demo.K_SHOT
    print(f"\n{k}-shot results on the same categories ({k} good train images of each "
          f"as references; mean ± std over the shot seeds "
          f"{' '.join(map(str, demo.SHOT_SEEDS))}):")
    print(shot_tables[None])
    print("\nMean rows, zero-shot and few-shot:")
    print(side_by_side({"zero-shot": (mean, mean_std), f"{k}-shot": (shot_mean, shot_std)}))
    print(f"\nunseen-category pixel AUROC {100 * mean['auroc_px']:.1f} ± "
          f"{100 * mean_std.get('auroc_px', 0.0):.1f} zero-shot, "
          f"{100 * shot_mean['auroc_px']:.1f} ± {100 * shot_std.get('auroc_px', 0.0):.1f} "
          f"{k}-shot (chance: 50.0); results, pictures and logs in {out}; "
          f"{time.time() - start:.0f} s")
    return 0


SHOWN = (("auroc_px", "pixel AUROC"), ("aupro_px", "AUPRO"), ("ap_px", "pixel AP"),
         ("auroc_sp", "image AUROC"), ("ap_sp", "image AP"))


def side_by_side(rows: dict) -> str:
    """A table of mean rows ({label: (mean row, its std)}), in percent, mean ± std."""
    def cell(mean, std, key):
        if mean.get(key) is None:
            return "n/a"
        return f"{100 * mean[key]:.1f} ± {100 * (std.get(key) or 0.0):.1f}"

    body = [[label] + [cell(m, s, key) for key, _ in SHOWN] for label, (m, s) in rows.items()]
    return tabulate(body, headers=["", *(title for _, title in SHOWN)], tablefmt="pipe",
                    disable_numparse=True, colalign=("left",) + ("right",) * len(SHOWN))


def _fmt(v):
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(main())
