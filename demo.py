"""The whole Bayes-PFL method on a laptop, in a few minutes, without downloads.

    python demo.py                # about 2.5 minutes on 2 CPU cores

1. generates a synthetic MVTec-style dataset (textures and objects with scratches, cracks,
   holes, stains and missing parts, with exact masks);
2. builds a small CLIP with RANDOM weights: pretrained CLIP weights cannot be bundled with
   the project, so this exercises and shows the method, not its real accuracy (for that, see
   test.sh with OpenAI's ViT-L/14-336 and the released checkpoints);
3. trains Bayes-PFL (both stages, the official losses, flows and schedule) on five categories,
   selecting (stage switch, early stop) on new images of one of them;
4. evaluates zero-shot on categories never seen in training or selection: the per-class
   table (test.py's) as mean ± std over three sampling seeds (the image tower runs once for
   all three), CSV/JSON and pictures under demo_output/;
5. evaluates the same categories 4-shot: 4 good train images of each category (never its test
   images) as references (test.py --k_shot 4), mean ± std over three shot seeds, and prints
   the two mean rows side by side.

Demo-only settings, stated here because they differ from train.py's official defaults: the
frozen CLIP outputs of a fixed pool of training images are computed once and reused (no
augmentation), the "rest" parameter group (RCA projections, class mapping, ...) learns at
1e-2 instead of 1e-4, 224 px input, batch 8, and a random CLIP of width 256 with 12 vision
blocks (layers 3 6 9 12). With a random text tower the image-level text score stays near
chance; the anomaly maps are what learns here.
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

from dataset.data import AnomalyDataset, make_loader
from dataset.shots import draw_references
from dataset.synthetic import write_standard
from models import AnomalyDetector, load_clip
from models.errors import SettingsError, UserError
from models.random_clip import make_clip_state_dict
from utils.evaluate import evaluate_runs, reference_banks
from utils.provenance import data_record, provenance
from utils.results import make_output_folder, write_runs, write_text
from utils.cli import Parser, fail, seed_int
from utils.misc import set_seed, setup_logging
from utils.training import TrainConfig, train

TRAIN_CLASSES = ["bolt", "checker", "gravel", "pill", "weave"]
VAL_CLASSES = ["bolt"]                      # selection, on other images than training's
UNSEEN_CLASSES = ["mesh", "ring", "wood"]   # zero-shot evaluation only
GEOMETRY = dict(vision_width=256, vision_layers=12, patch=16, grid=14, text_width=256,
                text_layers=4, embed_dim=256)
LAYERS = [3, 6, 9, 12]
IMAGE_SIZE = 224
TRAIN_IMAGES = 8                            # good train images of each evaluation category
K_SHOT = 4                                  # few-shot references per category
SHOT_SEEDS = [0, 1, 2]


def get_parser() -> argparse.ArgumentParser:
    p = Parser(description="Bayes-PFL demo on synthetic data with a random "
                                            "CLIP (CPU, a few minutes)")
    p.add_argument("--out", default="./demo_output", help="everything the demo writes")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=5,
                   help="epochs without improvement before the stage switch / stop "
                        "(official: 3)")
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


def make_data(root: str, seed: int, n_anomalous: int) -> None:
    common = dict(size=256, n_test_good=max(2, n_anomalous // 2), n_test_anomaly=n_anomalous,
                  overwrite=True)
    write_standard(root, name="demo_train", classes=TRAIN_CLASSES, seed=seed, n_train=1,
                   **common)
    # other images (another seed): the validation category and the unseen ones, with good
    # train images from which the few-shot references are drawn (the test images never)
    write_standard(root, name="demo_eval", classes=VAL_CLASSES + UNSEEN_CLASSES,
                   seed=seed + 1, n_train=TRAIN_IMAGES, **common)


DEMO_MARKER = ".bayes-pfl-demo"           # in --out: the folders below were written by the demo
DEMO_FOLDERS = ("data", "train", "results")


def check_args(args: argparse.Namespace) -> None:
    """Every setting checked before any work."""
    for name, least in (("epochs", 1), ("n_anomalous", 1), ("patience", 0), ("eval_seeds", 1)):
        if getattr(args, name) < least:
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
    logger.info("1/5 synthetic data: train %s | select %s | unseen %s", TRAIN_CLASSES,
                VAL_CLASSES, UNSEEN_CLASSES)
    make_data(data, args.seed, args.n_anomalous)

    logger.info("2/5 a CLIP with RANDOM weights (width %d, %d blocks, patch %d, %d px): no "
                "pretrained weights can be bundled, so this shows the method, not its accuracy",
                GEOMETRY["vision_width"], GEOMETRY["vision_layers"], GEOMETRY["patch"],
                IMAGE_SIZE)
    clip_path = os.path.join(out, "clip_random.pt")
    torch.save(make_clip_state_dict(seed=args.seed, **GEOMETRY), clip_path)

    logger.info("3/5 training Bayes-PFL on %s (%d epochs at most)", ", ".join(TRAIN_CLASSES),
                args.epochs)
    config = TrainConfig(
        dataset="demo_train", train_data_path=data, val_data_path=data,
        val_dataset="demo_eval", val_classes=VAL_CLASSES,
        save_path=os.path.join(out, "train"), pretrained_path=clip_path,
        features_list=LAYERS, image_size=IMAGE_SIZE, batch_size=8, epochs=args.epochs,
        sample_num=3, seed=args.seed, device=args.device, num_workers=0, print_freq=5,
        cache_features=True, lr_overrides={"rest": 1e-2}, val_batch_size=8,
        patience=args.patience, save_freq=args.epochs + 1)      # no per-epoch checkpoints
    result = train(config, progress=None if args.quiet else tqdm)
    os.remove(os.path.join(out, "train", "last.pth"))        # kept: best.pth and train.log
    logger.info("training: %d epochs, stage switch after epoch %s, best validation pixel AP "
                "%s, image AP %s", result.epochs_run, result.switch_epoch,
                _fmt(result.best_pixel_ap), _fmt(result.best_image_ap))

    logger.info("4/5 zero-shot evaluation on unseen categories: %s", ", ".join(UNSEEN_CLASSES))
    clip = load_clip(clip_path, image_size=IMAGE_SIZE, device=args.device)
    model = result.model.eval()
    detector = AnomalyDetector(clip, model, image_size=IMAGE_SIZE, sample_num=10,
                               stage=result.final_stage, layers=LAYERS)
    set_seed(args.seed)
    dataset = AnomalyDataset(data, "demo_eval", mode="test", image_size=IMAGE_SIZE,
                             class_names=UNSEEN_CLASSES)
    loader = make_loader(dataset, batch_size=8, shuffle=False, num_workers=0, seed=args.seed)
    results = os.path.join(out, "results")
    make_output_folder(results, "--out")        # its pictures are never read as inputs
    vis = None if args.no_vis else os.path.join(results, "imgs")
    seeds = [args.seed + k for k in range(args.eval_seeds)]
    runs = evaluate_runs(detector, loader, "demo_eval", seeds, pro="exact", vis_dir=vis,
                         progress=not args.quiet)
    settings = {"demo": vars(args), "stage": result.final_stage, "seeds": seeds}
    record = provenance(settings, clip_path, data=[data_record(data, "demo_eval")],
                        device=args.device, started=start)
    tables, mean, mean_std = write_runs(runs, results, "demo_eval", settings,
                                        {"provenance": record})
    print("\nZero-shot results on categories never seen in training (random-weight CLIP; "
          f"values in %, mean ± std over the sampling seeds {' '.join(map(str, seeds))}):")
    print(tables[None])

    logger.info("5/5 %d-shot evaluation on the same categories: %d good train images of each "
                "as references, shot seeds %s", K_SHOT, K_SHOT, SHOT_SEEDS)
    drawn = draw_references(data, "demo_eval", UNSEEN_CLASSES, K_SHOT, SHOT_SEEDS)
    shot_runs = evaluate_runs(detector, loader, "demo_eval", [args.seed], pro="exact",
                              progress=not args.quiet,
                              references=reference_banks(detector, dataset, drawn))
    shot_dir = os.path.join(results, f"{K_SHOT}shot")
    shot_settings = {**settings, "seeds": [args.seed], "k_shot": K_SHOT,
                     "shot_seeds": SHOT_SEEDS}
    references = {"k_shot": K_SHOT, "from": "the train split",
                  "paths": {str(shot): per_class for shot, per_class in drawn.items()}}
    shot_tables, shot_mean, shot_std = write_runs(
        shot_runs, shot_dir, "demo_eval", shot_settings,
        {"shot_seeds": SHOT_SEEDS, "references": references, "provenance": record})
    print(f"\n{K_SHOT}-shot results on the same categories ({K_SHOT} good train images of each "
          f"as references; mean ± std over the shot seeds {' '.join(map(str, SHOT_SEEDS))}):")
    print(shot_tables[None])
    print("\nMean rows, zero-shot and few-shot:")
    print(side_by_side({"zero-shot": (mean, mean_std), f"{K_SHOT}-shot": (shot_mean, shot_std)}))
    print(f"\nunseen-category pixel AUROC {100 * mean['auroc_px']:.1f} ± "
          f"{100 * mean_std.get('auroc_px', 0.0):.1f} zero-shot, "
          f"{100 * shot_mean['auroc_px']:.1f} ± {100 * shot_std.get('auroc_px', 0.0):.1f} "
          f"{K_SHOT}-shot (chance: 50.0); results, pictures and logs in {out}; "
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
