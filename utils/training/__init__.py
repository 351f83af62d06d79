"""Bayes-PFL training (SPEC section 6), one concept per module:

    config      TrainConfig (train.py's flags), TrainingError, the protocol's constants
    optim       the official Adam groups, stage parameters, warm-up + cosine schedule
    stages      StageController: the official remember / restore / switch / stop rule
    plan        which data trains and validates; the opt-in frozen-feature cache
    step        frozen CLIP encoding, the DDP-wrapped module, one optimisation step
    validation  mean pixel AP and image AP over the validation classes
    state       derived seeds, RNG states, the resumable last.pth
    progress    running losses on a progress bar
    trainer     Trainer and train(): train -> validate -> decide -> save -> apply

    from utils.training import TrainConfig, train
    result = train(TrainConfig(dataset="visa", epochs=30, seed=333))
    result.best_pixel_ap, result.history, result.best_path

Randomness is re-derived from (seed, epoch, rank) at the start of every epoch (Python,
NumPy, torch, the DataLoader's order, the DistributedSampler's epoch, the prompt of each
step) and every sample's augmentation from (seed, epoch, sample index); validation draws its
Monte Carlo samples from (seed, epoch) in a forked RNG. Nothing random is carried from one
epoch to the next, so a run stopped after epoch k and resumed from ``last.pth`` is identical
to an uninterrupted one, whatever the number of data-loader workers.

Epochs are numbered from 1 (``epoch_post_1_1.pth`` is written after the first epoch, trained
in stage 1); the stage in a file name is the stage the epoch was trained in, and the file
holds the parameters that were validated, before any restore. ``best.pth`` holds the best
parameters of the stage reached last; every checkpoint records its stage and model settings.
"""

from .config import (ADAM_BETAS, GROUPS, LOSS_KEYS, STAGE2_MODULES, TrainConfig, TrainingError,
                     model_spec)
from .optim import (WarmupCosine, group_learning_rates, group_parameter_names, make_optimizer,
                    make_scheduler, parameter_group, set_trainable, stage_parameter_names)
from .plan import DataPlan, FeatureCache, build_feature_cache, plan_data
from .progress import RunningLosses
from .stages import Decision, StageController
from .state import (RESUME_FORMAT, derive_seed, read_resume_state, rng_state,
                    set_rng_state)
from .step import TrainingStep, encode_images, optimisation_step
from .trainer import Trainer, TrainResult, train
from .validation import ValidationResult, validate

__all__ = [
    "ADAM_BETAS", "GROUPS", "LOSS_KEYS", "RESUME_FORMAT", "STAGE2_MODULES", "DataPlan",
    "Decision", "FeatureCache", "RunningLosses", "StageController", "TrainConfig",
    "TrainResult", "Trainer", "TrainingError", "TrainingStep", "ValidationResult",
    "WarmupCosine", "build_feature_cache", "derive_seed", "encode_images",
    "group_learning_rates", "group_parameter_names", "make_optimizer", "make_scheduler",
    "model_spec", "optimisation_step", "parameter_group", "plan_data", "read_resume_state",
    "rng_state", "set_rng_state", "set_trainable", "stage_parameter_names", "train", "validate",
]
