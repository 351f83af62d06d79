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

from dataset.data import AnomalyDataset, make_loader
from dataset.registry import dataset_info
from models import AnomalyDetector
from models.errors import UserError
from utils.cli import (Parser, add_model_arguments, add_runtime_arguments, default_workers,
                       model_request, positive_int)
from utils.evaluate import evaluate_runs
from utils.provenance import class_counts, data_record, provenance
from utils.results import make_output_folder, over_seeds, write_results
from utils.misc import log_to_files, resolve_device, set_seed, setup_logging


def get_parser() -> argparse.ArgumentParser:
    p = Parser(description="Bayes-PFL zero-shot evaluation",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # official flags
    p.add_argument("--dataset", default="mvtec", help="dataset name: meta_<dataset>.json "
                   "under --data_path (mvtec, visa, BTAD, KSDD2, RSDD, DAGM, DTD, HeadCT, "
                   "BrainMRI, Br35H, ISIC, ClinicDB, ColonDB, Kvasir, Endo, ...)")
    p.add_argument("--data_path", default="./dataset/mvisa/data", help="data root")
    p.add_argument("--checkpoint_path", default="./bayes_weight/train_visa.pth",
                   help="Bayes-PFL checkpoint; its stage is the one it records, else the "
                        "file name's (epoch_post_{e}_{stage}.pth), else 2")
    p.add_argument("--save_path", default="./results/mvtec", help="output folder")
    p.add_argument("--pretrained_path", default="./pretrained_weight/ViT-L-14-336px.pt",
                   help="OpenAI CLIP weights")
    add_model_arguments(p, from_checkpoint=True)
    p.add_argument("--sample_num", type=positive_int, default=10, help="Monte Carlo samples R")
    p.add_argument("--seed", type=int, default=111, help="the official test.sh uses 333")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="evaluate with each of these seeds (the image tower runs once for all) "
                        "and report every figure as mean ± std over them, beside each seed's "
                        "own table; replaces --seed")
    # accepted for compatibility with the official scripts
    p.add_argument("--config_path", default=None, help="accepted, unused")
    p.add_argument("--model", default=None, help="accepted, unused (geometry comes from the "
                                                 "CLIP file)")
    p.add_argument("--pretrained", default=None, help="accepted, unused")
    # added
    add_runtime_arguments(p)
    p.add_argument("--batch_size", type=positive_int, default=1,
                   help="images per forward; results do not depend on it")
    p.add_argument("--num_workers", type=int, default=default_workers(),
                   help="DataLoader workers (default: 4 at most, never more than the CPUs)")
    p.add_argument("--no_vis", action="store_true", help="skip the pictures")
    p.add_argument("--save_uncertainty", action="store_true",
                   help="a fifth panel in the pictures: the per-pixel spread of the anomaly "
                        "map over the prompt samples (scale 0..0.25)")
    p.add_argument("--pro", default="exact", choices=["exact", "official", "off"],
                   help="pixel AUPRO: exact, the official 200-threshold approximation, or off")
    p.add_argument("--classes", nargs="+", default=None, help="evaluate these classes only")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logger = setup_logging(None)          # the console only, until every input is checked
    try:
        device = resolve_device(args.device, args.device_id)
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        detector = AnomalyDetector.from_files(
            args.pretrained_path, args.checkpoint_path, device=device,
            sample_num=args.sample_num, precision=args.precision, verify=not args.no_verify,
            **model_request(args))
        dataset = AnomalyDataset(args.data_path, args.dataset, mode="test",
                                 image_size=detector.image_size, class_names=args.classes)
        detector.model.wording = dict(dataset_info(args.dataset).wording)
        detector.model.check_class_names(dataset.class_names)
        make_output_folder(args.save_path)
    except UserError as e:
        logger.error("%s", e)
        return 1
    logger = setup_logging(os.path.join(args.save_path, f"test_{args.dataset}.log"))
    logger.info("arguments: %s", vars(args))
    logger.info("checkpoint %s (stage %d), %d test images, device %s, precision %s",
                args.checkpoint_path, detector.stage, len(dataset), device, args.precision)
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds else [args.seed]
    set_seed(seeds[0])
    loader = make_loader(dataset, batch_size=args.batch_size, shuffle=False,
                         num_workers=args.num_workers, seed=seeds[0])
    vis_dir = None if args.no_vis else os.path.join(args.save_path, "imgs")
    settings = {**vars(args), "seeds": seeds, "stage": detector.stage,
                "model_spec": detector.spec.to_dict()}
    data = [data_record(args.data_path, args.dataset, class_counts(dataset.samples))]
    runs: dict[int, dict] = {seed: {} for seed in seeds}
    start = time.time()

    def save(name: str, rows: dict) -> None:     # each class's results before its pictures
        for seed, row in rows.items():
            runs[seed][name] = row
        write_all(args, runs, settings, provenance(
            settings, args.pretrained_path, args.checkpoint_path, data, device, args.precision,
            start))

    try:
        evaluate_runs(detector, loader, args.dataset, seeds, pro=args.pro, vis_dir=vis_dir,
                      progress=not args.no_progress, logger=logger, on_class=save,
                      save_uncertainty=args.save_uncertainty)
        tables = write_all(args, runs, settings, provenance(
            settings, args.pretrained_path, args.checkpoint_path, data, device, args.precision,
            start))
    except UserError as e:
        logger.error("%s", e)
        return 1
    for seed, table in tables.items():
        if seed is not None:
            log_to_files(logger, f"results of {args.dataset}, seed {seed}:\n{table}")
    print(tables[None])
    log_to_files(logger, f"results of {args.dataset}"
                 + (f" (mean ± std over seeds {seeds})" if len(seeds) > 1 else "")
                 + f":\n{tables[None]}")
    logger.info("done in %.1f s; results in %s", time.time() - start, args.save_path)
    return 0


def write_all(args, runs: dict, settings: dict, record: dict) -> dict:
    """``results_<dataset>``: the single run, or mean ± std over the seeds beside each seed's
    ``seed<k>_results_<dataset>``. Returns the tables: {None: the main one, seed: each}."""
    seeds = list(runs)
    if len(seeds) == 1:
        table, _ = write_results(runs[seeds[0]], args.save_path, args.dataset, settings,
                                 extra={"seeds": seeds, "provenance": record})
        return {None: table}
    tables = {}
    for seed in seeds:
        tables[seed], _ = write_results(runs[seed], args.save_path, args.dataset,
                                        {**settings, "seed": seed},
                                        name=f"seed{seed}_results_{args.dataset}",
                                        extra={"seeds": [seed], "provenance": record})
    summary = over_seeds(runs)
    tables[None], _ = write_results(summary["classes"], args.save_path, args.dataset, settings,
                                    summary["std"], summary["mean"], summary["mean_std"],
                                    extra={"seeds": seeds, "provenance": record})
    return tables


if __name__ == "__main__":
    sys.exit(main())
