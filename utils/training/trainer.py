"""The trainer: builds everything from a :class:`TrainConfig` and runs the official two-stage
training, epoch after epoch: train -> validate -> decide -> save -> apply the decision."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from dataset.augment import opencv_warning
from dataset.data import AnomalyDataset, make_loader
from dataset.outputs import check_apart
from dataset.registry import dataset_info
from models import BayesPFL, load_clip
from models.checkpoint import atomic_save, save_checkpoint
from utils import distributed as dist_utils
from utils.misc import resolve_device, set_seed
from utils.provenance import class_counts, data_record, provenance

from .config import LOSS_KEYS, SHOWN_LOSSES, TrainConfig, TrainingError, model_spec
from .folder import claimed_on_main
from .optim import group_learning_rates, make_optimizer, make_scheduler, set_trainable
from .plan import build_feature_cache, plan_data
from .progress import RunLog, RunningLosses, progress_bar
from .stages import Decision, StageController
from .state import (SEED_GLOBAL, SEED_LOADER, SEED_PROMPT, SEED_VALIDATION, cpu_copy,
                    derive_seed, read_resume_state, restore, resume_record)
from .step import TrainingStep, encode_images, optimisation_step
from .validation import ValidationResult, check_validation_data, validate

@dataclass
class TrainResult:
    """Outcome of a run. ``best_pixel_ap`` / ``best_image_ap``: the best validation figures of
    stage 1 / stage 2 (None when the stage saw no scorable epoch); ``best_epoch``: stage -> epoch
    of that figure; ``history``: one record per epoch (losses, figures, per-class figures,
    learning rates, decision); ``checkpoints``: the epoch_post files written; ``model``: the
    module as training left it (after an early stop, the current parameters: the
    official rule does not restore; ``best.pth`` holds the best stage-2 ones)."""

    best_pixel_ap: float | None
    best_image_ap: float | None
    best_epoch: dict[int, int | None]
    switch_epoch: int | None
    stopped_early: bool
    final_stage: int
    epochs_run: int
    history: list[dict]
    checkpoints: list[str]
    best_path: str | None
    last_path: str | None
    model: BayesPFL | None = field(default=None, repr=False)


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs the two-stage training.

    ``callback(record)`` is called after every epoch with that epoch's history record (a dict);
    returning True stops training after that epoch (resumable; with several processes rank 0's
    answer counts). ``progress(iterable, desc=..., total=..., leave=...)`` wraps loops in a
    progress bar (e.g. ``tqdm.tqdm``); a bar with ``set_postfix`` shows the running losses every
    ``print_freq`` steps. Subclasses may replace :meth:`validate`."""

    def __init__(self, config: TrainConfig, callback: Callable[[dict], Any] | None = None,
                 progress: Callable | None = None):
        self.config = config
        self.callback = callback
        self.progress = progress
        self.device = resolve_device(config.device, config.device_id)
        torch.backends.cuda.matmul.allow_tf32 = bool(config.tf32)
        info = dist_utils.env_info()
        if info.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", info.local_rank)
            torch.cuda.set_device(self.device)
        self.dist = dist_utils.init_distributed(self.device)
        self.main = self.dist.is_main
        self.log = RunLog(self.main)
        self.ddp: nn.Module | None = None

    def info(self, message: str) -> None:
        self.log.info(message)

    # -- setup -----------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.config
        # read first, so that a bad file or other settings are reported before any work
        self._resume_state = read_resume_state(cfg.resume, cfg) if cfg.resume else None
        self.started = time.time()
        self.plan = plan_data(cfg)
        # the run folder apart from the data: no checkpoint or log lands on a dataset's file
        check_apart(cfg.save_path, "--save_path", [("--train_data_path", self.plan.train_root),
                                                   ("--val_data_path", self.plan.val_root)])
        train_ds = AnomalyDataset(self.plan.train_root, self.plan.train_dataset, mode="train",
                                  image_size=cfg.image_size, class_names=self.plan.train_classes,
                                  seed=cfg.seed)
        self.val_ds = AnomalyDataset(self.plan.val_root, self.plan.val_dataset, mode="test",
                                     image_size=cfg.image_size, class_names=self.plan.val_classes)
        if train_ds.classification_only:
            raise TrainingError(
                f"training dataset {self.plan.train_dataset} ({train_ds.meta_file}) has no masks "
                f"(classification only): stage 1's focal and dice losses would train every "
                f"anomalous image on an all-zero mask; train on data with a mask for every "
                f"anomalous image (python -m dataset.folder ROOT --dataset NAME --mask_dir "
                f"DIR)")
        check_validation_data(self.val_ds)
        self.data_records = [
            data_record(self.plan.train_root, self.plan.train_dataset,
                        class_counts(train_ds.samples)),
            data_record(self.plan.val_root, self.plan.val_dataset,
                        class_counts(self.val_ds.samples))]
        self.clip = load_clip(cfg.pretrained_path, image_size=cfg.image_size, device=self.device,
                              activation=cfg.activation, verify=cfg.verify_weights)
        torch.manual_seed(cfg.seed)
        self.spec = model_spec(cfg, self.clip)
        self.model = BayesPFL.from_clip(self.clip, **self.spec.bayes_pfl_kwargs())
        # the registry's wording, then the meta files' (a folder dataset's prompt words)
        self.model.wording = {**dataset_info(self.plan.val_dataset).wording,
                              **dataset_info(self.plan.train_dataset).wording,
                              **self.val_ds.wording, **train_ds.wording}
        self.model.check_class_names(train_ds.class_names + self.val_ds.class_names)
        self.model.to(self.device)
        dist_utils.broadcast_module(self.model)
        self.step_module = TrainingStep(self.model, self.clip)

        # the official augmentation runs on the training images unless their features are cached
        self.augmenting = train_ds.augment and not cfg.cache_features
        if cfg.cache_features:
            plain = AnomalyDataset(self.plan.train_root, self.plan.train_dataset, mode="train",
                                   image_size=cfg.image_size,
                                   class_names=self.plan.train_classes, augment=False,
                                   mosaic_prob=0.0)
            self.train_set: Dataset = build_feature_cache(
                self.clip, plain, cfg, self.device, self.progress if self.main else None)
            workers = 0
        else:
            self.train_set = train_ds
            workers = cfg.num_workers
        self.sampler = None
        if self.dist.enabled:
            self.sampler = DistributedSampler(self.train_set, num_replicas=self.dist.world_size,
                                              rank=self.dist.rank, shuffle=True, seed=cfg.seed,
                                              drop_last=False)
        self.loader = make_loader(self.train_set, batch_size=cfg.batch_size, shuffle=True,
                                  num_workers=workers, seed=cfg.seed, drop_last=False,
                                  sampler=self.sampler)
        self.val_loader = make_loader(self.val_ds, batch_size=cfg.val_batch_size, shuffle=False,
                                      num_workers=cfg.num_workers, seed=cfg.seed)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.epochs * self.steps_per_epoch

        self.controller = StageController(cfg.patience)
        self.remembered: dict[int, dict[str, torch.Tensor]] = {}
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=cfg.precision == "fp16" and self.device.type == "cuda")
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self.checkpoints: list[str] = []
        self.best_path: str | None = None
        self._enter_stage(1)

    def _enter_stage(self, stage: int) -> None:
        """Trainable parameters, optimiser, schedule (stage 1 only) and DDP wrapper of a stage."""
        set_trainable(self.model, stage)
        self.optimizer = make_optimizer(self.model, self.config, stage)
        self.scheduler = (make_scheduler(self.optimizer, self.total_steps, self.config.warmup_ratio)
                          if stage == 1 else None)
        self.ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.step_module, device_ids=ids)

    def _resume(self, path: str, state: dict) -> None:
        restore(self, state)
        self.info(f"resumed from {path}: epoch {self.epoch} done, stage {self.controller.stage}, "
                  f"step {self.global_step}")

    # -- epochs ----------------------------------------------------------------------------

    def _seed_epoch(self, epoch: int) -> list[int]:
        cfg, rank = self.config, self.dist.rank
        set_seed(derive_seed(cfg.seed, epoch, rank, SEED_GLOBAL))
        if isinstance(self.train_set, AnomalyDataset):
            self.train_set.set_epoch(epoch)           # per-sample draws of this epoch
        self.loader.generator.manual_seed(derive_seed(cfg.seed, epoch, rank, SEED_LOADER))
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        prompts = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 0, SEED_PROMPT))
        return torch.randint(cfg.prompt_num, (self.steps_per_epoch,), generator=prompts).tolist()

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of the current stage; returns the mean loss terms (over all ranks)."""
        cfg, device, stage = self.config, self.device, self.controller.stage
        prompt_indices = self._seed_epoch(epoch)
        self.model.train()
        forward = self.ddp if self.ddp is not None else self.step_module
        sums = {k: torch.zeros((), device=device) for k in LOSS_KEYS}
        first_bad = torch.full((), -1, dtype=torch.long, device=device)   # step, no host sync
        count = 0
        bar = progress_bar(self.progress if self.main else None, self.loader,
                        f"epoch {epoch}/{cfg.epochs} stage {stage}", total=self.steps_per_epoch)
        display = RunningLosses(bar, device) if hasattr(bar, "set_postfix") else None
        for step, batch in enumerate(bar):
            if "global" in batch:                                  # cached features
                g = batch["global"].to(device, non_blocking=True)
                tokens = [t.to(device, non_blocking=True) for t in batch["tokens"].unbind(1)]
            else:
                g, tokens = encode_images(self.clip, batch["image"], cfg.features_list, device,
                                          cfg.precision)
            losses = optimisation_step(forward, self.optimizer, self.scaler, g, tokens,
                                       list(batch["cls_name"]), batch["label"], batch["mask"],
                                       prompt_indices[step], stage, device, cfg.precision)
            if self.scheduler is not None:
                self.scheduler.step()
            self.global_step += 1
            count += 1
            for k, v in losses.items():
                sums[k] += v
            bad = ~torch.isfinite(losses["loss"])
            first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
            if cfg.print_freq and (step + 1) % cfg.print_freq == 0 and display is not None:
                display.update({k: v for k, v in sums.items() if k in losses and k in SHOWN_LOSSES},
                               count)
        if hasattr(bar, "close"):
            bar.close()
        keys = [k for k in LOSS_KEYS if stage == 1 or k in ("loss", "loss_ce")]
        totals = torch.stack([sums[k] for k in keys] + [torch.tensor(float(count), device=device),
                                                        (first_bad >= 0).float()])
        totals = dist_utils.all_reduce_sum(totals).tolist()
        if totals[-1]:
            self._diverged(epoch, int(first_bad))
        return {k: totals[i] / totals[-2] for i, k in enumerate(keys)}

    def _diverged(self, epoch: int, step: int) -> None:
        """Stop: the loss was not finite (``step`` -1: on another process)."""
        where = f"step {step + 1} of {self.steps_per_epoch}" if step >= 0 else "another process"
        kept = (f"{os.path.join(self.config.save_path, 'last.pth')} still holds epoch "
                f"{self.epoch}" if self.epoch else "no epoch was completed")
        raise TrainingError(f"the training loss is not finite in epoch {epoch} ({where}): the "
                            f"training diverged; {kept}. Lower the learning rates "
                            f"(--learning_rate_linear, --learning_rate_prompt, "
                            f"--learning_rate_PFL, --temperature_lr)")

    def validate(self, epoch: int) -> ValidationResult:
        """Validation of the current parameters (rank 0 only)."""
        return validate(self.clip, self.model, self.val_loader, self.config,
                        self.controller.stage,
                        derive_seed(self.config.seed, epoch, 0, SEED_VALIDATION), self.progress,
                        epoch)

    def _save_last(self, finished: bool) -> str:
        path = os.path.join(self.config.save_path, "last.pth")
        atomic_save(resume_record(self, finished), path)
        return path

    def _provenance(self) -> dict:
        """What a checkpoint records of the run: its provenance, with the wall time so far."""
        return {"provenance": provenance(self.config.to_dict(), self.config.pretrained_path,
                                         data=self.data_records, device=self.device,
                                         precision=self.config.precision,
                                         started=self.started)}

    def _learning_rates(self) -> dict[str, float]:
        return {g["group"]: g["lr"] for g in self.optimizer.param_groups}

    def run(self) -> TrainResult:
        cfg = self.config
        try:
            self.setup()            # data, weights, model: problems surface before any output
            with claimed_on_main(self.main, cfg.save_path, cfg.resume is not None,
                                 cfg.overwrite):
                return self._start()
        finally:
            if hasattr(self, "model"):
                set_trainable(self.model, None)
            self.log.close()

    def _start(self) -> TrainResult:
        cfg = self.config
        self.log.open(cfg.save_path)
        self.info("arguments: " + json.dumps(cfg.to_dict(), sort_keys=True))
        self.info("provenance: " + json.dumps({k: v for k, v in self._provenance()["provenance"]
                                               .items() if k != "settings"}, sort_keys=True))
        self.info(f"training {self.plan.train_dataset} classes "
                  f"{self.plan.train_classes or 'all'}; validating on {self.plan.val_dataset} "
                  f"{self.plan.val_classes or 'all'}"
                  + (" (held out of training)" if self.plan.held_out else "")
                  + f"; {self.dist.world_size} process(es) x batch {cfg.batch_size}, "
                  f"{self.steps_per_epoch} steps per epoch, device {self.device}")
        warning = opencv_warning() if self.augmenting else None
        if warning:
            self.log.warning(warning)
        if self._resume_state is not None:
            self._resume(cfg.resume, self._resume_state)
            self._resume_state = None
        return self._loop()

    def _loop(self) -> TrainResult:
        cfg = self.config
        self.stopped_early = self.controller.finished
        self.last_path = os.path.join(cfg.save_path, "last.pth") if self.epoch else None
        if self.epoch and (self.stopped_early or self.epoch >= cfg.epochs):
            self.info(f"{self.last_path} is a finished run (epoch {self.epoch}); nothing to train")
        while not self.controller.finished and self.epoch < cfg.epochs:
            epoch, stage = self.epoch + 1, self.controller.stage
            losses = self.train_epoch(epoch)
            result = self.validate_epoch(epoch)
            decision = self.controller.update(epoch, result.pixel_ap, result.image_ap)
            record = self._record(epoch, stage, losses, result, decision)
            self.save(record, decision)
            self.apply(decision)
            self.save_state(decision)
            if self._pause_after(record, decision):
                break
        if self.best_path and self.controller.best_epoch[2] is None and self.epoch >= cfg.epochs:
            self.info("best.pth holds stage-1 parameters (no stage-2 epoch was validated); "
                      "it records stage 1, which test.py and predict.py use")
        return self._result()

    def validate_epoch(self, epoch: int) -> ValidationResult:
        """Validation on rank 0, shared with every rank (a diverged run stops on every rank)."""
        result = None
        if self.main:
            try:
                result = self.validate(epoch)
            except TrainingError as error:
                result = error
        result = dist_utils.broadcast_object(result)
        if isinstance(result, TrainingError):
            raise result
        return result

    def _record(self, epoch: int, stage: int, losses: dict, result: ValidationResult,
                decision: Decision) -> dict:
        record = {"epoch": epoch, "stage": stage, "losses": losses,
                  "pixel_ap": result.pixel_ap, "image_ap": result.image_ap,
                  "per_class": result.per_class, "lr": self._learning_rates(),
                  "decision": dataclasses.asdict(decision)}
        self.log.epoch(record, result.skipped)
        return record

    def save(self, record: dict, decision: Decision) -> None:
        """The epoch's files: ``epoch_post_{epoch}_{stage}.pth`` (the validated parameters,
        before any restore, as officially) and ``best.pth`` on an improvement."""
        cfg, epoch, stage = self.config, record["epoch"], record["stage"]
        if self.main and epoch % cfg.save_freq == 0:
            path = os.path.join(cfg.save_path, f"epoch_post_{epoch}_{stage}.pth")
            save_checkpoint(self.model, path, stage, self.spec, self._provenance())
            self.checkpoints.append(path)
        if decision.improved:
            self.remembered[stage] = cpu_copy(self.model.state_dict())
            if self.main:
                self.best_path = os.path.join(cfg.save_path, "best.pth")
                save_checkpoint(self.model, self.best_path, stage, self.spec, self._provenance())
            self.info(f"epoch {epoch}: best {'pixel' if stage == 1 else 'image'} AP so far "
                      f"({decision.value:.4f}); parameters remembered, best.pth written")
        self.history.append(record)
        self.epoch = epoch

    def apply(self, decision: Decision) -> None:
        """Restore, switch to stage 2 or stop, as decided."""
        stage, epoch = decision.stage, decision.epoch
        if decision.restore:
            if stage in self.remembered:
                self.model.load_state_dict(self.remembered[stage])
            dist_utils.broadcast_module(self.model)
            self.info(f"no better pixel AP for {decision.patience} epochs: restored the "
                      f"parameters of epoch {self.controller.best_epoch[stage]}")
        if decision.switch:
            self.remembered.pop(1, None)
            self._enter_stage(2)
            self.info(f"switching to stage 2 after epoch {epoch} (class_mapping, image_mapping, "
                      f"fuse at lr {group_learning_rates(self.config)['stage2']:g})")
        if decision.stop:
            self.stopped_early = True
            self.info(f"no better image AP for {decision.patience} epochs: stage 2 stopped "
                      f"after epoch {epoch}, keeping the current parameters; best image AP "
                      f"{self.controller.best[2]:.4f} at epoch {self.controller.best_epoch[2]}"
                      f" (best.pth)")

    def save_state(self, decision: Decision) -> None:
        """``last.pth``: everything --resume needs, after the decision was applied."""
        if self.main:
            self.last_path = self._save_last(decision.stop or self.epoch >= self.config.epochs)
        dist_utils.barrier()

    def _pause_after(self, record: dict, decision: Decision) -> bool:
        """True to leave the loop early: the callback asked for it, or --stop_after."""
        cfg, epoch = self.config, record["epoch"]
        wants_stop = bool(self.callback(record)) if self.callback is not None else False
        wants_stop = dist_utils.broadcast_object(wants_stop)
        if wants_stop or (cfg.stop_after is not None and epoch >= cfg.stop_after):
            if not (decision.stop or epoch >= cfg.epochs):
                self.info(f"stopping after epoch {epoch}; --resume continues from "
                          f"{self.last_path}")
            return True
        return False

    def _result(self) -> TrainResult:
        best = {k: (v if self.controller.best_epoch[k] is not None else None)
                for k, v in self.controller.best.items()}
        return TrainResult(
            best_pixel_ap=best[1], best_image_ap=best[2],
            best_epoch=dict(self.controller.best_epoch),
            switch_epoch=self.controller.switch_epoch, stopped_early=self.stopped_early,
            final_stage=self.controller.stage, epochs_run=self.epoch, history=self.history,
            checkpoints=list(self.checkpoints), best_path=self.best_path,
            last_path=self.last_path, model=self.model)


def train(config: TrainConfig, callback: Callable[[dict], Any] | None = None,
          progress: Callable | None = None) -> TrainResult:
    """Train Bayes-PFL as configured (see :class:`Trainer` for ``callback`` and ``progress``).

    Raises ``models.WeightsError`` (CLIP weights), ``dataset.data.DatasetError`` (data files) or
    :class:`TrainingError` (settings, resume file) for problems the user can fix."""
    return Trainer(config, callback, progress).run()