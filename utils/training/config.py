"""Training settings (train.py's flags) and the constants of the official protocol."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from models.errors import UserError
from utils.cli import DEFAULT_CLIP, default_workers
from models.spec import OFFICIAL_LAYERS, ModelSpec, check_layers

ADAM_BETAS = (0.5, 0.999)
STAGE2_MODULES = ("class_mapping", "image_mapping", "fuse")
GROUPS = ("prompt", "temperature", "PFL", "rest")
LOSS_KEYS = ("loss", "loss_ce", "loss_seg", "loss_focal", "loss_dice", "loss_kl",
             "loss_kl_context", "loss_kl_normal", "loss_kl_abnormal", "loss_orth")
SHOWN_LOSSES = ("loss", "loss_ce", "loss_seg", "loss_kl", "loss_orth")   # on the progress bar


class TrainingError(UserError, ValueError):
    """A training setting or file the user can fix (the message says what to do)."""


# Configuration and result
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Mirrors train.py's flags (same names and defaults)."""

    dataset: str = "visa"
    train_data_path: str = "./dataset/mvisa/data"
    val_data_path: str = "./dataset/mvisa/data"
    save_path: str = "./my_exps/train_visa"
    pretrained_path: str = DEFAULT_CLIP
    prompt_context_len: int = 5
    prompt_num: int = 3
    prompt_state_len: int = 5
    learning_rate: float = 1e-4            # accepted, no effect (as officially)
    learning_rate_PFL: float = 1e-3
    learning_rate_prompt: float = 1e-3
    learning_rate_linear: float = 1e-4     # the stage-1 "rest" group and stage 2
    temperature_lr: float = 0.01
    features_list: list[int] = field(default_factory=lambda: list(OFFICIAL_LAYERS))
    image_size: int = 518
    batch_size: int = 32                   # per process
    epochs: int = 30
    sample_num: int = 5                    # validation R
    num_flows: int = 10
    seed: int = 111
    print_freq: int = 10
    save_freq: int = 1
    device: str = "auto"
    device_id: int | None = None
    num_workers: int = field(default_factory=default_workers)   # one per available CPU
    precision: str = "fp32"
    tf32: bool = False                     # allow TF32 matmuls on CUDA
    activation: str = "gelu"
    resume: str | None = None
    val_dataset: str | None = None
    val_classes: list[str] | None = None
    val_batch_size: int = 8
    patience: int = 3
    warmup_ratio: float = 0.1
    stop_after: int | None = None
    verify_weights: bool = True
    overwrite: bool = False                # replace a run already in save_path
    # Opt-in options for small runs (off by default: the official behaviour).
    cache_features: bool = False
    cache_size: int | None = None
    lr_overrides: dict[str, float] | None = None

    def __post_init__(self):
        self.features_list = [int(x) for x in self.features_list]
        if self.val_classes is not None:
            self.val_classes = list(self.val_classes)
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise TrainingError(f"precision must be fp32, bf16 or fp16, not {self.precision!r}")
        unknown = set(self.lr_overrides or {}) - set(GROUPS) - {"stage2"}
        if unknown:
            raise TrainingError(f"unknown learning-rate group(s) {sorted(unknown)}; the groups "
                                f"are {', '.join(GROUPS)} and stage2")
        for name in ("batch_size", "epochs", "sample_num", "save_freq", "val_batch_size"):
            if int(getattr(self, name)) < 1:
                raise TrainingError(f"{name} must be at least 1, not {getattr(self, name)}")
        if int(self.patience) < 0:
            raise TrainingError(f"patience must be at least 0, not {self.patience}")
        if int(self.num_workers) < 0:
            raise TrainingError(f"num_workers must be at least 0, not {self.num_workers}")
        rates = {"learning_rate_PFL": self.learning_rate_PFL,
                 "learning_rate_prompt": self.learning_rate_prompt,
                 "learning_rate_linear": self.learning_rate_linear,
                 "temperature_lr": self.temperature_lr, **(self.lr_overrides or {})}
        for name, value in rates.items():
            if not math.isfinite(float(value)) or float(value) < 0:
                raise TrainingError(f"the learning rate {name} must be a finite number of at "
                                    f"least 0, not {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_spec(config: TrainConfig, clip) -> ModelSpec:
    """The settings of the model a run trains (recorded in its checkpoints)."""
    check_layers(config.features_list, clip.geometry.vision_layers)
    return ModelSpec(prompt_num=config.prompt_num, prompt_context_len=config.prompt_context_len,
                     prompt_state_len=config.prompt_state_len, num_flows=config.num_flows,
                     layers=tuple(config.features_list), image_size=config.image_size,
                     activation=config.activation, backbone=clip.geometry.name)
