"""The demo's recipe (demo.py, benchmarks/demo_spread.py): its synthetic data, its random CLIP,
its training settings and its two evaluations, so that the demo and the measurement of its
spread run the same code.

Demo-only settings, which differ from train.py's official defaults, and why:

- the frozen CLIP outputs of a fixed pool of training images are computed once and reused (no
  augmentation), 224 px input, batch 8, a random CLIP of width 256 with 12 vision blocks
  (layers 3 6 9 12): the whole method in minutes on a CPU;
- the "rest" parameter group (RCA projections, class mapping, ...) learns at 5e-3 instead of
  1e-4: with random CLIP features the official rate learns nothing in 30 epochs;
- a patience as long as the training (``PATIENCE``): stage 1 runs for every epoch. The official
  early switch restores the epoch of the best validation pixel AP, and on the demo's few
  synthetic validation images that figure peaks by chance (epoch 3 in one run, 12 in another,
  as float rounding decides), which moved the printed figure by 8 points between machines;
- the evaluated model is the mean of the parameters after each of the last ``AVERAGE_LAST``
  epochs (the trajectory of a 30-epoch run on 180 images still wanders; its average does much
  less). benchmarks/demo_spread.py measures what is left: the printed figure under 1 and 2
  threads, initial weights moved by 1e-6 and another training seed.
"""

from __future__ import annotations

import torch

from dataset.data import AnomalyDataset, make_loader
from dataset.shots import draw_references
from dataset.synthetic import write_standard
from models.random_clip import make_clip_state_dict
from utils.evaluate import evaluate_runs, reference_banks
from utils.training import TrainConfig
from utils.training.trainer import Trainer

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
EPOCHS = 30
PATIENCE = EPOCHS                           # stage 1 for the whole budget (module docstring)
REST_LR = 5e-3
AVERAGE_LAST = 15                           # epochs whose parameters are averaged


def make_data(root: str, seed: int, n_anomalous: int) -> None:
    """The demo's synthetic datasets under ``root``: demo_train (the training categories) and
    demo_eval (new images of the validation category and the unseen ones, with good train
    images for the few-shot references; the test images are never references)."""
    common = dict(size=256, n_test_good=max(2, n_anomalous // 2), n_test_anomaly=n_anomalous,
                  overwrite=True)
    write_standard(root, name="demo_train", classes=TRAIN_CLASSES, seed=seed, n_train=1,
                   **common)
    write_standard(root, name="demo_eval", classes=VAL_CLASSES + UNSEEN_CLASSES,
                   seed=seed + 1, n_train=TRAIN_IMAGES, **common)


def make_clip(path: str, seed: int) -> str:
    """The random-weight CLIP of the demo's geometry, written to ``path``."""
    torch.save(make_clip_state_dict(seed=seed, **GEOMETRY), path)
    return path


def train_config(data: str, clip_path: str, save_path: str, seed: int, device: str = "cpu",
                 epochs: int = EPOCHS, patience: int | None = None) -> TrainConfig:
    """The demo's training settings (module docstring); ``patience`` None: ``epochs``."""
    return TrainConfig(
        dataset="demo_train", train_data_path=data, val_data_path=data,
        val_dataset="demo_eval", val_classes=VAL_CLASSES, save_path=save_path,
        pretrained_path=clip_path, features_list=LAYERS, image_size=IMAGE_SIZE, batch_size=8,
        epochs=epochs, sample_num=3, seed=seed, device=device, num_workers=0, print_freq=5,
        cache_features=True, lr_overrides={"rest": REST_LR}, val_batch_size=8,
        patience=epochs if patience is None else patience,
        save_freq=epochs + 1)                   # no per-epoch checkpoints


def eval_data(data: str, seed: int) -> tuple[AnomalyDataset, object]:
    """The unseen categories' test images and their loader."""
    dataset = AnomalyDataset(data, "demo_eval", mode="test", image_size=IMAGE_SIZE,
                             class_names=UNSEEN_CLASSES)
    return dataset, make_loader(dataset, batch_size=8, shuffle=False, num_workers=0, seed=seed)


def zero_shot_runs(detector, loader, seeds, vis_dir: str | None = None,
                   progress: bool = False) -> dict:
    """{seed: {class: row}} of the zero-shot evaluation, one run per sampling seed."""
    return evaluate_runs(detector, loader, "demo_eval", seeds, pro="exact", vis_dir=vis_dir,
                         progress=progress)


def few_shot_runs(detector, dataset, loader, data: str, seed: int,
                  progress: bool = False) -> tuple[dict, dict]:
    """({(seed, shot seed): {class: row}}, the drawn references) of the K-shot evaluation."""
    drawn = draw_references(data, "demo_eval", UNSEEN_CLASSES, K_SHOT, SHOT_SEEDS)
    runs = evaluate_runs(detector, loader, "demo_eval", [seed], pro="exact", progress=progress,
                         references=reference_banks(detector, dataset, drawn))
    return runs, drawn


def mean_pixel_auroc(runs: dict) -> float:
    """The mean over runs of the mean over classes of the pixel AUROC (the printed figure)."""
    means = [sum(row["auroc_px"] for row in rows.values()) / len(rows) for rows in runs.values()]
    return sum(means) / len(means)


class AveragingTrainer(Trainer):
    """The official trainer, which also keeps the mean of the module's floating-point
    parameters after each of the last ``average_last`` epochs of the budget;
    :meth:`averaged_state` is the module's state dict with those means."""

    def __init__(self, config: TrainConfig, average_last: int = AVERAGE_LAST, **kwargs):
        super().__init__(config, **kwargs)
        self.average_last = average_last
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def save(self, record: dict, decision) -> None:
        super().save(record, decision)
        if record["epoch"] > self.config.epochs - self.average_last:
            for name, value in self.model.state_dict().items():
                if value.dtype.is_floating_point:
                    value = value.detach().to(torch.float64)
                    self._sums[name] = self._sums[name] + value if name in self._sums \
                        else value.clone()
            self._count += 1

    def averaged_state(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if not self._count:
            return state
        return {name: (self._sums[name] / self._count).to(value.dtype)
                if name in self._sums else value for name, value in state.items()}


def train_averaged(config: TrainConfig, progress=None, trainer_class=AveragingTrainer,
                   **kwargs):
    """Train as :func:`utils.training.train` does, then load the averaged parameters into the
    returned model (strictly)."""
    trainer = trainer_class(config, progress=progress, **kwargs)
    result = trainer.run()
    result.model.load_state_dict(trainer.averaged_state())
    return result
