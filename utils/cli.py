"""Command-line pieces shared by the scripts: the model settings (official flag names), the
runtime settings (device, precision), and the one way a script reports a user error."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from typing import Any

from models.noise import SEED_MAX
from models.precision import PRECISIONS
from models.spec import ACTIVATIONS, ModelSpec

DEVICES = ("auto", "cpu", "cuda")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors ("prog: error: ... (see --help)"), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the system has one, e.g.
    under taskset or a container's CPU set; else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_workers(processes: int | None = None) -> int:
    """DataLoader workers by default: one per available CPU (:func:`available_cpus`), shared
    by the ``processes`` of this machine (default: torchrun's ranks on it, LOCAL_WORLD_SIZE,
    else WORLD_SIZE, else 1)."""
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    return max(1, available_cpus() // max(1, processes))


WORKERS_HELP = ("DataLoader workers (default: one per CPU available to this process; under "
                "torchrun, the CPUs shared by the processes of a machine)")


def _whole_within(text: str, low: int, high: int | None, what: str) -> int:
    """``text`` as an integer within ``low`` .. ``high`` (None: no upper end), or the argparse
    error saying ``what`` it must be."""
    value = int(text)
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"{what}, not {value}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1 (argparse type)."""
    return _whole_within(text, 1, None, "must be at least 1")


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (argparse type)."""
    return _whole_within(text, 0, None, "must be at least 0")


def seed_int(text: str) -> int:
    """A seed within 0 .. SEED_MAX (argparse type)."""
    return _whole_within(text, 0, SEED_MAX, f"must be a whole number within 0..{SEED_MAX} (a "
                                            f"seed)")


def port_int(text: str) -> int:
    """A TCP port, 1 .. 65535 (argparse type)."""
    return _whole_within(text, 1, 65535, "must be a port within 1..65535")


def finite_float(text: str) -> float:
    """A finite number (argparse type): "nan" and "inf" are refused."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def probability(text: str) -> float:
    """A number within [0, 1] (argparse type): scores and thresholds are probabilities."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1 (scores are probabilities), not "
                                         f"{text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (argparse type)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, not {text}")
    return value


def class_name_text(text: str) -> str:
    """A class name for the prompts (argparse type): not empty, not only spaces."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name the object (e.g. 'metal nut'), not be empty")
    return text


def interrupt_on_sigterm() -> None:
    """Make SIGTERM end the process as Ctrl-C does (a KeyboardInterrupt), so that the scripts
    leave their files marked as interrupted, not half-written, whichever way they are
    stopped."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, handler)


# The official weight files (pretrained_weight/ and bayes_weight/ of the repository)
DEFAULT_CLIP = "./pretrained_weight/ViT-L-14-336px.pt"
DEFAULT_CHECKPOINT = "./bayes_weight/train_visa.pth"


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """--pretrained_path and --checkpoint_path with the official defaults (the files of
    pretrained_weight/ and bayes_weight/)."""
    parser.add_argument("--pretrained_path", default=DEFAULT_CLIP,
                        help="OpenAI CLIP weights")
    parser.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT,
                        help="Bayes-PFL checkpoint; its stage is the one it records, else the "
                             "file name's (epoch_post_{e}_{stage}.pth), else 2")


def add_model_arguments(parser: argparse.ArgumentParser, from_checkpoint: bool) -> None:
    """--features_list, --image_size, --prompt_num, --prompt_context_len, --prompt_state_len,
    --num_flows, --activation. ``from_checkpoint``: the defaults are None, meaning "what the
    checkpoint records, else the official value" (test.py, predict.py); otherwise the official
    values (train.py)."""
    spec = ModelSpec()

    def default(value):
        return None if from_checkpoint else value

    def shown(value) -> str:
        text = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        return (f"default: recorded in the checkpoint, else {text}" if from_checkpoint
                else f"default: {text}")

    a = parser.add_argument
    a("--features_list", type=int, nargs="+", default=default(list(spec.layers)),
      help=f"1-based CLIP vision blocks whose tokens are used ({shown(spec.layers)})")
    a("--image_size", type=int, default=default(spec.image_size),
      help=f"input side S ({shown(spec.image_size)})")
    a("--prompt_num", type=int, default=default(spec.prompt_num),
      help=f"prompt bank size N ({shown(spec.prompt_num)})")
    a("--prompt_context_len", type=int, default=default(spec.prompt_context_len),
      help=f"context vectors P ({shown(spec.prompt_context_len)})")
    a("--prompt_state_len", type=int, default=default(spec.prompt_state_len),
      help=f"state vectors Q ({shown(spec.prompt_state_len)})")
    a("--num_flows", type=int, default=default(spec.num_flows),
      help=f"planar flows K ({shown(spec.num_flows)})")
    a("--activation", choices=ACTIVATIONS, default=default(spec.activation),
      help=f"CLIP MLP activation; the official code and checkpoints use exact GELU "
           f"({shown(spec.activation)})")


def model_request(args: argparse.Namespace) -> dict[str, Any]:
    """The model settings asked for on the command line (None: not asked for)."""
    return {"layers": args.features_list, "image_size": args.image_size,
            "prompt_num": args.prompt_num, "prompt_context_len": args.prompt_context_len,
            "prompt_state_len": args.prompt_state_len, "num_flows": args.num_flows,
            "activation": args.activation}


def add_runtime_arguments(parser: argparse.ArgumentParser, device_default: str = "auto") -> None:
    """--device, --device_id, --precision, --tf32, --no_verify."""
    a = parser.add_argument
    a("--device", choices=DEVICES, default=device_default,
      help="auto: CUDA when available, else the CPU")
    a("--device_id", type=int, default=None,
      help="CUDA index used with --device cuda (torchrun uses LOCAL_RANK instead)")
    a("--precision", choices=tuple(PRECISIONS), default="fp32",
      help="fp32 (the reference) or autocast around the frozen CLIP towers")
    a("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    a("--no_verify", action="store_true",
      help="skip the SHA-256 check of OpenAI-named CLIP files")


def fail(message: str, code: int = 1) -> int:
    """Print a user error as one line on stderr; returns the exit code."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
