"""Zero-shot evaluation of a Bayes-PFL checkpoint on one standardised dataset.

    python test.py --dataset mvtec --data_path ./dataset/mvisa/data \
        --checkpoint_path ./bayes_weight/train_visa.pth --save_path ./results/mvtec

Prints the per-class table (and its mean row), writes results_<dataset>.csv / .json, a log
file and, unless --no_vis, the pictures under <save_path>/imgs/<class>/<specie>/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from dataset.data import AnomalyDataset, DatasetError, make_loader
from models import AnomalyDetector, BayesPFL, WeightsError, load_clip
from utils.checkpoint import load_checkpoint, stage_from_filename
from utils.evaluate import evaluate_dataset, write_results
from utils.misc import log_to_files, resolve_device, set_seed, setup_logging


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Bayes-PFL zero-shot evaluation",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # official flags
    p.add_argument("--dataset", default="mvtec", help="dataset name: meta_<dataset>.json "
                   "under --data_path (mvtec, visa, BTAD, KSDD2, RSDD, DAGM, DTD, HeadCT, "
                   "BrainMRI, Br35H, ISIC, ClinicDB, ColonDB, Kvasir, Endo, ...)")
    p.add_argument("--data_path", default="./dataset/mvisa/data", help="data root")
    p.add_argument("--checkpoint_path", default="./bayes_weight/train_visa.pth",
                   help="Bayes-PFL checkpoint; the stage is read from epoch_post_{e}_{stage}.pth, "
                        "else 2")
    p.add_argument("--save_path", default="./results/mvtec", help="output folder")
    p.add_argument("--pretrained_path", default="./pretrained_weight/ViT-L-14-336px.pt",
                   help="OpenAI CLIP weights")
    p.add_argument("--features_list", type=int, nargs="+", default=[6, 12, 18, 24],
                   help="1-based vision blocks whose tokens are used")
    p.add_argument("--image_size", type=int, default=518)
    p.add_argument("--prompt_context_len", type=int, default=5)
    p.add_argument("--prompt_num", type=int, default=3)
    p.add_argument("--prompt_state_len", type=int, default=5)
    p.add_argument("--sample_num", type=int, default=10, help="Monte Carlo samples R")
    p.add_argument("--num_flows", type=int, default=10)
    p.add_argument("--seed", type=int, default=111, help="the official test.sh uses 333")
    # accepted for compatibility with the official scripts
    p.add_argument("--device_id", type=int, default=None, help="CUDA index (with --device cuda)")
    p.add_argument("--config_path", default=None, help="accepted, unused")
    p.add_argument("--model", default=None, help="accepted, unused (geometry comes from the "
                                                 "CLIP file)")
    p.add_argument("--pretrained", default=None, help="accepted, unused")
    # added
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch_size", type=int, default=1,
                   help="images per forward; results do not depend on it")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--no_vis", action="store_true", help="skip the pictures")
    p.add_argument("--pro", default="exact", choices=["exact", "official", "off"],
                   help="pixel AUPRO: exact, the official 200-threshold approximation, or off")
    p.add_argument("--activation", default="gelu", choices=["gelu", "quick_gelu"],
                   help="CLIP MLP activation (the released checkpoints use exact GELU)")
    p.add_argument("--classes", nargs="+", default=None, help="evaluate these classes only")
    p.add_argument("--no_verify", action="store_true",
                   help="skip the SHA-256 check of OpenAI-named CLIP files")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    os.makedirs(args.save_path, exist_ok=True)
    logger = setup_logging(os.path.join(args.save_path, f"test_{args.dataset}.log"))
    logger.info("arguments: %s", vars(args))
    try:
        device = resolve_device(args.device, args.device_id)
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        set_seed(args.seed)
        stage = stage_from_filename(args.checkpoint_path)
        dataset = AnomalyDataset(args.data_path, args.dataset, mode="test",
                                 image_size=args.image_size, class_names=args.classes)
        clip = load_clip(args.pretrained_path, image_size=args.image_size, device=device,
                         activation=args.activation, verify=not args.no_verify)
        model = BayesPFL.from_clip(clip, prompt_num=args.prompt_num,
                                   prompt_context_len=args.prompt_context_len,
                                   prompt_state_len=args.prompt_state_len,
                                   num_flows=args.num_flows, layers=args.features_list)
        load_checkpoint(model, args.checkpoint_path)
        model.eval()
    except (WeightsError, DatasetError, ValueError) as e:
        logger.error("%s", e)
        return 1
    logger.info("checkpoint %s (stage %d), %d test images, device %s, precision %s",
                args.checkpoint_path, stage, len(dataset), device, args.precision)
    detector = AnomalyDetector(clip, model, image_size=args.image_size,
                               sample_num=args.sample_num, stage=stage,
                               layers=args.features_list, precision=args.precision)
    loader = make_loader(dataset, batch_size=args.batch_size, shuffle=False,
                         num_workers=args.num_workers, seed=args.seed)
    vis_dir = None if args.no_vis else os.path.join(args.save_path, "imgs")
    start = time.time()
    try:
        rows = evaluate_dataset(detector, loader, args.dataset, pro=args.pro, vis_dir=vis_dir,
                                progress=not args.no_progress, logger=logger)
    except DatasetError as e:
        logger.error("%s", e)
        return 1
    settings = {k: v for k, v in vars(args).items()}
    settings["stage"] = stage
    table, _ = write_results(rows, args.save_path, args.dataset, settings)
    print(table)
    log_to_files(logger, f"results of {args.dataset}:\n{table}")
    logger.info("done in %.1f s; results in %s", time.time() - start, args.save_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
