"""Export one class's whole detector (both CLIP towers, the prompt flows, RCA, the scoring) to
one ONNX file, run with ONNX Runtime by ``predict.py --onnx`` or ``utils.inference.OnnxDetector``.

    python export.py --pretrained_path pretrained_weight/ViT-L-14-336px.pt \
        --checkpoint_path bayes_weight/train_visa.pth --class_name "metal nut" --out part.onnx

The graph takes ``image`` [B, 3, S, S] (preprocessed as predict.py does; any batch size) and
returns ``image_score`` [B] and ``anomaly_map`` [B, S, S], the text score and unsmoothed map of
``AnomalyDetector.predict`` with the noise of --seed (``models.noise.shared_noise``): the class,
the seed, R, the image size, the stage, the layers and, with --reference, the few-shot memory
bank are fixed in the file and recorded in its metadata. Needs the ``deploy`` extra
(``pip install -e ".[deploy]"``). See README, "Deploying a detector".
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from models import AnomalyDetector
from models.errors import UserError
from utils.cli import (Parser, add_model_arguments, add_weight_arguments, class_name_text, fail,
                       model_request, non_negative_float, positive_int, seed_int)
from utils.export import export_onnx
from utils.inference import find_references, references_of
from utils.misc import setup_logging
from utils.onnx_detector import require_onnx
from dataset.outputs import check_writable
from utils.results import OutputError


def get_parser() -> argparse.ArgumentParser:
    p = Parser(description="Export a Bayes-PFL detector for one class to an ONNX file",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_weight_arguments(p)
    p.add_argument("--class_name", type=class_name_text, required=True,
                   help="the object the file scores (put in the prompts, e.g. 'metal nut')")
    p.add_argument("--out", required=True, help="the ONNX file to write (e.g. part.onnx)")
    add_model_arguments(p, from_checkpoint=True)
    p.add_argument("--sample_num", type=positive_int, default=10, help="Monte Carlo samples R")
    p.add_argument("--seed", type=seed_int, default=111,
                   help="seed of the prompt noise baked into the file (predict.py's --seed)")
    p.add_argument("--reference", nargs="+", default=None, metavar="PATH",
                   help="good images of the part (files, folders or glob patterns): their "
                        "few-shot memory bank is baked in, and anomaly_map is the zero-shot map "
                        "plus --fewshot_weight times the few-shot map")
    p.add_argument("--fewshot_weight", type=non_negative_float, default=None,
                   help="weight of the few-shot map in the anomaly map (with --reference; "
                        "default 1)")
    p.add_argument("--uncertainty", action="store_true",
                   help="also the outputs anomaly_map_std, image_score_std and score_std (the "
                        "spread over the prompt samples; predict.py --onnx --uncertainty)")
    p.add_argument("--fp16", action="store_true",
                   help="store the weights as float16 (half the file; computed in float32)")
    p.add_argument("--external_data", action="store_true",
                   help="weights in OUT.data beside the graph (always done past 2 GiB)")
    p.add_argument("--no_verify", action="store_true",
                   help="skip the SHA-256 check of OpenAI-named CLIP files")
    return p


def run(args) -> dict:
    """Check the extra and the output, load the weights (CPU), export; returns the summary."""
    require_onnx()
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(folder):
        raise OutputError(f"--out {args.out} must be a file in an existing folder: choose "
                          f"another --out")
    references = find_references(args.reference) if args.reference else None
    # the file written never replaces an input, nor a file this project did not write
    inputs = [args.pretrained_path, args.checkpoint_path, *(references or [])]
    data = args.out + ".data"
    for path in inputs:
        if os.path.exists(path) and any(os.path.exists(o) and os.path.samefile(path, o)
                                        for o in (args.out, data)):
            raise OutputError(f"--out {args.out} would write over the input {path}: choose "
                              f"another --out")
    check_writable([args.out, data], "--out", folder)
    detector = AnomalyDetector.from_files(
        args.pretrained_path, args.checkpoint_path, device="cpu", sample_num=args.sample_num,
        verify=not args.no_verify, **model_request(args))
    detector.fewshot_weight = args.fewshot_weight
    bank = references_of(detector, references) if references else None   # upright by EXIF
    result = export_onnx(detector, args.class_name, args.out, seed=args.seed, references=bank,
                         uncertainty=args.uncertainty, fp16=args.fp16,
                         external_data=args.external_data or None,
                         clip_path=args.pretrained_path, checkpoint_path=args.checkpoint_path)
    return {"path": result.path, "files": result.files, "size_bytes": result.size_bytes,
            "seconds": result.seconds, "metadata": result.metadata}


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.fewshot_weight is not None and not args.reference:
        parser.error("--fewshot_weight applies to the few-shot mode only: add --reference "
                     "PATH ..., or drop --fewshot_weight")
    args.fewshot_weight = 1.0 if args.fewshot_weight is None else args.fewshot_weight
    setup_logging(level=logging.WARNING)
    try:
        summary = run(args)
    except UserError as e:
        return fail(str(e), 1)
    meta = summary["metadata"]
    refs = f", {meta['references']} reference images" if meta["references"] else ""
    print(f"class '{meta['class_name']}', seed {meta['seed']}, R {meta['sample_num']}, "
          f"{meta['image_size']} px, stage {meta['stage']}, layers "
          f"{' '.join(map(str, meta['layers']))}{refs}; outputs {', '.join(meta['outputs'])}")
    files = " + ".join(summary["files"])
    print(f"wrote {files} ({summary['size_bytes'] / 1e6:.1f} MB"
          f"{', float16 weights' if meta['fp16_weights'] else ''}) in "
          f"{summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
