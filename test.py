"""Zero-shot evaluation of a Bayes-PFL checkpoint on one standardised dataset.

    python test.py --dataset mvtec --data_path ./dataset/mvisa/data \
        --checkpoint_path ./bayes_weight/train_visa.pth --save_path ./results/mvtec

Prints the per-class table (and its mean row), writes results_<dataset>.csv / .json, a log
file and, unless --no_vis, the pictures under <save_path>/imgs/<class>/<specie>/. A rerun into
the same --save_path replaces the earlier run's files of that dataset; while a run goes on its
results are results_<dataset>.incomplete.csv / .json (a run that is stopped leaves them so).
--k_shot K adds K good train images per class as few-shot references.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from contextlib import ExitStack

import torch

from dataset.data import AnomalyDataset, make_loader
from dataset.locks import folder_lock
from dataset.outputs import check_apart, check_writable, clear_own, kept_note
from dataset.registry import dataset_info
from dataset.shots import draw_references, same_draws
from models import AnomalyDetector
from models.errors import UserError
from utils import distributed
from utils.cli import (DEFAULT_CHECKPOINT, DEFAULT_CLIP, WORKERS_HELP, Parser,
                       add_model_arguments, add_runtime_arguments, default_workers,
                       interrupt_on_sigterm, model_request, non_negative_float,
                       non_negative_int, positive_int, seed_int)
from utils.distributed_eval import ClassShards, agree
from utils.evaluate import evaluate_runs, reference_banks, run_label
from utils.pictures import picture_names
from utils.provenance import class_counts, data_record, provenance
from utils.results import OutputError, make_output_folder, run_name, write_runs
from utils.misc import log_to_files, resolve_device, set_seed, setup_logging

LOCK_FILE = ".test.lock"
INCOMPLETE = ".incomplete"        # the result files of a run that has not finished


def get_parser() -> argparse.ArgumentParser:
    p = Parser(description="Bayes-PFL zero-shot evaluation",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # official flags
    p.add_argument("--dataset", default="mvtec", help="dataset name: meta_<dataset>.json "
                   "under --data_path (mvtec, visa, BTAD, KSDD2, RSDD, DAGM, DTD, HeadCT, "
                   "BrainMRI, Br35H, ISIC, ClinicDB, ColonDB, Kvasir, Endo, ...)")
    p.add_argument("--data_path", default="./dataset/mvisa/data", help="data root")
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT,
                   help="Bayes-PFL checkpoint; its stage is the one it records, else the "
                        "file name's (epoch_post_{e}_{stage}.pth), else 2")
    p.add_argument("--save_path", default="./results/mvtec", help="output folder")
    p.add_argument("--pretrained_path", default=DEFAULT_CLIP,
                   help="OpenAI CLIP weights")
    add_model_arguments(p, from_checkpoint=True)
    p.add_argument("--sample_num", type=positive_int, default=10, help="Monte Carlo samples R")
    p.add_argument("--seed", type=seed_int, default=111, help="the official test.sh uses 333")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=None,
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
    p.add_argument("--num_workers", type=non_negative_int, default=None, help=WORKERS_HELP)
    p.add_argument("--no_vis", action="store_true", help="skip the pictures")
    p.add_argument("--save_uncertainty", action="store_true",
                   help="a fifth panel in the pictures: the per-pixel spread of the anomaly "
                        "map over the prompt samples (scale 0..0.25)")
    p.add_argument("--pro", default="exact", choices=["exact", "official", "off"],
                   help="pixel AUPRO: exact, the official 200-threshold approximation, or off")
    p.add_argument("--classes", nargs="+", default=None, help="evaluate these classes only")
    p.add_argument("--k_shot", type=positive_int, default=None,
                   help="few-shot: K good reference images per class, drawn from the class's "
                        "train split (never the test split), added as a memory bank of patch "
                        "features; not the paper's zero-shot protocol")
    p.add_argument("--shot_seeds", type=seed_int, nargs="+", default=None,
                   help="with --k_shot: the seeds of the reference draws (default: 0); every "
                        "figure is reported as mean ± std over them (and over --seeds)")
    p.add_argument("--fewshot_weight", type=non_negative_float, default=None,
                   help="with --k_shot: the anomaly map is the zero-shot map plus this times "
                        "the few-shot map (default: 1)")
    p.add_argument("--no_progress", action="store_true")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that only make sense together, checked before anything is read or written; the
    few-shot defaults filled in."""
    if args.k_shot is None:
        for flag in ("shot_seeds", "fewshot_weight"):
            if getattr(args, flag) is not None:
                parser.error(f"--{flag} applies to the few-shot mode only: add --k_shot K, or "
                             f"drop --{flag}")
    for flag in ("seeds", "shot_seeds"):
        values = getattr(args, flag) or []
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            parser.error(f"--{flag} repeats {' '.join(map(str, repeated))}: give each seed once "
                         f"(a repeated seed would add a copy of one run to the mean ± std)")
    args.shot_seeds = args.shot_seeds if args.shot_seeds is not None else [0]
    args.fewshot_weight = args.fewshot_weight if args.fewshot_weight is not None else 1.0


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    interrupt_on_sigterm()
    info = distributed.env_info()         # torchrun: one process per rank
    # the console only, until every input is checked; rank 0 tells the run, the others only
    # their warnings
    logger = setup_logging(None, logging.WARNING if info.enabled and info.rank != 0
                           else logging.INFO)
    held = ExitStack()
    try:
        error = None
        try:
            device = resolve_device(args.device, args.device_id)
            if info.enabled and device.type == "cuda":
                device = torch.device("cuda", info.local_rank)
                torch.cuda.set_device(device)
            distributed.init_distributed(device)
        except UserError as e:
            logger.error("%s", e)
            return 1
        try:
            state = prepare(args, device, held)
        except UserError as e:
            error = str(e)
        agree(error)                      # every rank stops if one cannot start
        return evaluate(args, *state)
    except UserError as e:
        logging.getLogger("bayes_pfl").error("%s", e)
        return 1
    except KeyboardInterrupt:
        if distributed.is_main():
            partial = os.path.join(args.save_path, f"results_{args.dataset}{INCOMPLETE}.json")
            if os.path.isfile(partial):
                logging.getLogger("bayes_pfl").error(
                    "interrupted: the classes evaluated so far are in %s (marked incomplete); "
                    "rerun to replace them", partial)
            else:
                logging.getLogger("bayes_pfl").error(
                    "interrupted before any class was evaluated: no result file of this run "
                    "was written (an earlier run's complete results, if any, are kept)")
        return 130
    finally:
        held.close()                      # the lock of --save_path
        distributed.cleanup()


def prepare(args, device, held: ExitStack) -> tuple:
    """Everything checked before anything is written, then (rank 0) --save_path created,
    locked (held until ``held`` closes) and cleared of the previous run's outputs of this
    dataset (its pictures only in a folder a run marked)."""
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    detector = AnomalyDetector.from_files(
        args.pretrained_path, args.checkpoint_path, device=device, sample_num=args.sample_num,
        precision=args.precision, verify=not args.no_verify, **model_request(args))
    detector.fewshot_weight = args.fewshot_weight
    dataset = AnomalyDataset(args.data_path, args.dataset, mode="test",
                             image_size=detector.image_size, class_names=args.classes)
    # the registry's prompt wording, then the meta file's (a folder dataset's words)
    detector.model.wording = {**dataset_info(args.dataset).wording, **dataset.wording}
    detector.model.check_class_names(dataset.class_names)
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds else [args.seed]
    shot_seeds = list(dict.fromkeys(args.shot_seeds)) if args.k_shot else []
    drawn = (draw_references(args.data_path, args.dataset, dataset.class_names, args.k_shot,
                             shot_seeds) if args.k_shot else None)
    same = same_draws(drawn) if drawn else []
    if same:
        logging.getLogger("bayes_pfl").warning(
            "the shot seeds %s draw the same %d references of class(es) %s (--k_shot %d takes "
            "all or nearly all of their train images): their ± over the shot seeds is 0 by "
            "construction, not a measured spread", shot_seeds, args.k_shot, ", ".join(same),
            args.k_shot)
    # outputs apart from the data: no picture or result lands on a dataset's file
    check_apart(args.save_path, "--save_path", [("--data_path", args.data_path)],
                [("the meta file", path) for sample in dataset.samples
                 for path in (sample["img_path"], sample["mask_path"]) if path])
    replaced: list[str] = []
    if distributed.is_main():
        planned = planned_outputs(args, dataset, seeds, shot_seeds)
        if os.path.isdir(args.save_path):      # refused before the folder is even marked
            check_writable(planned, "--save_path", args.save_path)
        make_output_folder(args.save_path)
        held.enter_context(folder_lock(
            os.path.join(args.save_path, LOCK_FILE),
            f"--save_path {args.save_path} is being written by another test.py",
            "no test.py is running", OutputError))
        check_writable(planned, "--save_path", args.save_path)
        replaced, kept = clear_previous_outputs(args, dataset.class_names)
        if kept:
            logging.getLogger("bayes_pfl").warning("%s", kept_note(kept, "--save_path",
                                                                  args.save_path))
    return detector, dataset, seeds, shot_seeds, drawn, device, replaced


def evaluate(args, detector, dataset, seeds, shot_seeds, drawn, device, replaced) -> int:
    """The evaluation proper: results written class by class (rank 0) as incomplete files,
    renamed to the final ones once every class is in; across processes each rank scores its
    share of every class and writes its images' pictures."""
    main = distributed.is_main()
    world = distributed.world_size()
    logger = (setup_logging(os.path.join(args.save_path, f"test_{args.dataset}.log"), mode="w")
              if main else logging.getLogger("bayes_pfl"))
    if replaced:
        logger.info("replaced the previous run's outputs: %s", ", ".join(replaced))
    logger.info("arguments: %s", vars(args))
    logger.info("checkpoint %s (stage %d), %d test images, device %s, precision %s%s",
                args.checkpoint_path, detector.stage, len(dataset), device, args.precision,
                f", {world} processes" if world > 1 else "")
    if drawn is not None:
        logger.info("few-shot: %d reference images per class from the train split, shot seeds "
                    "%s, few-shot weight %g", args.k_shot, shot_seeds, detector.fewshot_weight)
    set_seed(seeds[0])
    sampler = (ClassShards([s["cls_name"] for s in dataset.samples], distributed.rank(), world)
               if world > 1 else None)
    workers = args.num_workers if args.num_workers is not None else default_workers()
    loader = make_loader(dataset, batch_size=args.batch_size, shuffle=False,
                         num_workers=workers, seed=seeds[0], sampler=sampler)
    vis_dir = None if args.no_vis else picture_folder(args)
    settings = {**vars(args), "seeds": seeds, "shot_seeds": shot_seeds, "stage": detector.stage,
                "model_spec": detector.spec.to_dict(), "fewshot_weight": detector.fewshot_weight,
                "processes": world}
    data = [data_record(args.data_path, args.dataset, class_counts(dataset.samples))]
    extra = {} if drawn is None else {"references": {
        "k_shot": args.k_shot, "from": "the train split", "fewshot_weight": detector.fewshot_weight,
        "paths": {str(shot): per_class for shot, per_class in drawn.items()}}}
    runs: dict = {}
    start = time.time()

    def record() -> dict:
        return provenance(settings, args.pretrained_path, args.checkpoint_path, data, device,
                          args.precision, start)

    def save(name: str, rows: dict) -> None:     # each class's results before its pictures
        for key, row in rows.items():
            runs.setdefault(key, {})[name] = row
        write_all(args, runs, settings, {**extra, "provenance": record()},
                  pending=[c for c in dataset.class_names if c not in next(iter(runs.values()))])

    banks = None if drawn is None else reference_banks(detector, dataset, drawn)
    # the last class's save() writes the complete files before its pictures: a picture that
    # fails after it leaves them complete
    evaluate_runs(detector, loader, args.dataset, seeds, pro=args.pro, vis_dir=vis_dir,
                  progress=not args.no_progress and main, logger=logger, on_class=save,
                  save_uncertainty=args.save_uncertainty, references=banks,
                  shot_seeds=shot_seeds if drawn is not None else None)
    if not main:
        return 0
    tables = write_all(args, runs, settings, {**extra, "provenance": record()}, pending=[])
    for key, table in tables.items():
        if key is not None:
            log_to_files(logger, f"results of {args.dataset}, {run_label(key)}:\n{table}")
    print(tables[None])
    over = "seeds" if drawn is None else "runs (seed, shot seed)"
    log_to_files(logger, f"results of {args.dataset}"
                 + (f" (mean ± std over the {over} {list(runs)})" if len(runs) > 1 else "")
                 + f":\n{tables[None]}")
    logger.info("done in %.1f s; results in %s", time.time() - start, args.save_path)
    return 0


def planned_outputs(args, dataset: AnomalyDataset, seeds, shot_seeds) -> list[str]:
    """Every file this run may write into --save_path (result files complete and incomplete,
    the log, the pictures), so that none of the user's is written over."""
    keys = [(s, t) for s in seeds for t in shot_seeds] if shot_seeds else list(seeds)
    names = [f"results_{args.dataset}"] + ([run_name(k, args.dataset) for k in keys]
                                           if len(keys) > 1 else [])
    files = [os.path.join(args.save_path, name + suffix + ext) for name in names
             for suffix in ("", INCOMPLETE) for ext in (".csv", ".json")]
    files.append(os.path.join(args.save_path, f"test_{args.dataset}.log"))
    if not args.no_vis:
        pictures = picture_folder(args)
        files += [os.path.join(pictures, name)
                  for name in picture_names(dataset.samples).values()]
    return files


def picture_folder(args) -> str:
    """The pictures of a dataset: <save_path>/imgs/<dataset>/<class>/<specie>/."""
    return os.path.join(args.save_path, "imgs", args.dataset)


def _previous_results(args) -> list[str]:
    """The result files of this dataset in --save_path (complete or incomplete, any seed)."""
    pattern = re.compile(rf"^(seed-?\d+_(shot-?\d+_)?)?results_{re.escape(args.dataset)}"
                         rf"({re.escape(INCOMPLETE)})?\.(csv|json)$")
    return [os.path.join(args.save_path, name) for name in sorted(os.listdir(args.save_path))
            if pattern.match(name)]


def clear_previous_outputs(args, classes) -> tuple[list[str], list[str]]:
    """Before the run: remove an earlier run's incomplete result files of this dataset and its
    pictures of ``classes`` (the classes evaluated now), so that this run's pictures never mix
    with an older run's. Its complete result files stay until this run's are complete
    (:func:`write_all`): a rerun that fails loses nothing. Only files that carry the project's
    marker go (dataset.outputs). Returns (removed, kept)."""
    paths = [p for p in _previous_results(args) if INCOMPLETE in os.path.basename(p)]
    paths += [os.path.join(picture_folder(args), name) for name in classes]
    return clear_own(paths, args.save_path)


def write_all(args, runs: dict, settings: dict, extra: dict, pending: list[str]) -> dict:
    """``results_<dataset>``: the single run, or mean ± std over the runs (seeds, or (seed,
    shot seed) pairs) beside each run's own files. While classes are ``pending`` the files are
    ``...<INCOMPLETE>.csv/json`` (status "incomplete", the classes still to come listed); the
    complete files replace them. Returns the tables: {None: the main one, run: each}."""
    suffix = INCOMPLETE if pending else ""
    status = {"status": "incomplete" if pending else "complete", "classes_pending": pending}
    tables, _, _ = write_runs(runs, args.save_path, args.dataset, settings, {**extra, **status},
                              suffix, with_mean=not pending)
    names = [f"results_{args.dataset}"] + ([run_name(k, args.dataset) for k in runs]
                                           if len(runs) > 1 else [])
    if not pending:     # complete: the incomplete files and an earlier run's others are gone
        written = {os.path.join(args.save_path, name + ext) for name in names
                   for ext in (".csv", ".json")}
        stale = [p for p in _previous_results(args) if p not in written]
        removed, _ = clear_own(stale, args.save_path)
        if removed and any(INCOMPLETE not in name for name in removed):
            logging.getLogger("bayes_pfl").info(
                "removed the earlier run's result files this run does not write: %s",
                ", ".join(n for n in removed if INCOMPLETE not in n))
    return tables


if __name__ == "__main__":
    sys.exit(main())
