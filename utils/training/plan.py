"""Which data trains and validates, and the opt-in cache of frozen-CLIP features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset

from dataset.data import AnomalyDataset, DatasetError, load_meta, make_loader
from dataset.registry import dataset_info

from .config import TrainConfig, TrainingError
from .progress import progress_bar
from .state import SEED_CACHE, derive_seed
from .step import encode_images


# Data
# ------------------------------------------------------------------------------------------------


@dataclass
class DataPlan:
    train_dataset: str
    train_root: str
    train_classes: list[str] | None    # None: all classes
    val_dataset: str
    val_root: str
    val_classes: list[str] | None
    held_out: bool                     # validation classes removed from the training data


def plan_data(config: TrainConfig) -> DataPlan:
    """Which classes train and which validate (official cross-dataset choice by default)."""
    official = dataset_info(config.dataset).validation
    val_dataset = config.val_dataset
    if val_dataset is None:
        if official is None:
            raise TrainingError(
                f"there is no official validation set for --dataset {config.dataset}; pass "
                f"--val_dataset and --val_classes (e.g. --val_dataset {config.dataset} "
                f"--val_classes <held-out classes>)")
        val_dataset = official[0]
    val_classes = config.val_classes
    if not val_classes:
        if official is not None and val_dataset == official[0]:
            val_classes = list(official[1])
        elif val_dataset == config.dataset:
            raise TrainingError(
                f"validating on the training dataset {config.dataset} needs --val_classes: the "
                f"classes to hold out of training and validate on")
        else:
            val_classes = None
    train_classes = None
    held_out = val_dataset == config.dataset
    if held_out:
        available = sorted(load_meta(config.train_data_path, config.dataset)["test"])
        unknown = [c for c in val_classes if c not in available]
        if unknown:
            raise DatasetError(f"validation class(es) {', '.join(unknown)} are not in "
                               f"{config.train_data_path}/meta_{config.dataset}.json; available: "
                               f"{', '.join(available)}")
        train_classes = [c for c in available if c not in set(val_classes)]
        if not train_classes:
            raise TrainingError(f"--val_classes holds out every class of {config.dataset}; "
                                f"leave some for training")
    return DataPlan(config.dataset, config.train_data_path, train_classes, val_dataset,
                    config.val_data_path, val_classes, held_out)


class FeatureCache(Dataset):
    """Frozen-CLIP outputs of a fixed pool of training images (no augmentation), kept in memory.

    Items: ``global`` [D], ``tokens`` [L, G*G, V], ``mask`` [1, S, S], ``label``, ``cls_name``."""

    def __init__(self, features: torch.Tensor, tokens: torch.Tensor, masks: torch.Tensor,
                 labels: torch.Tensor, class_names: list[str]):
        self.features, self.tokens, self.masks = features, tokens, masks
        self.labels, self.class_names = labels, class_names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"global": self.features[index], "tokens": self.tokens[index],
                "mask": self.masks[index].float(), "label": int(self.labels[index]),
                "cls_name": self.class_names[index]}


@torch.no_grad()
def build_feature_cache(clip, dataset: AnomalyDataset, config: TrainConfig,
                        device: torch.device, progress: Callable | None = None) -> FeatureCache:
    """Encode a seeded subset of ``cache_size`` images (all when None) of ``dataset`` (which
    should have augmentation and mosaic off) once with the frozen CLIP."""
    n = len(dataset)
    generator = torch.Generator().manual_seed(derive_seed(config.seed, 0, 0, SEED_CACHE))
    pool = torch.randperm(n, generator=generator)[:config.cache_size or n].sort().values
    subset = torch.utils.data.Subset(dataset, pool.tolist())
    loader = make_loader(subset, batch_size=config.batch_size, shuffle=False,
                         num_workers=config.num_workers, seed=config.seed)
    feats, toks, masks, labels, names = [], [], [], [], []
    for batch in progress_bar(progress, loader, "caching CLIP features"):
        g, tokens = encode_images(clip, batch["image"], config.features_list, device,
                                  config.precision)
        feats.append(g.cpu())
        toks.append(torch.stack(tokens, dim=1).cpu())             # [B, L, GG, V]
        masks.append(batch["mask"].bool())
        labels.append(batch["label"])
        names.extend(batch["cls_name"])
    return FeatureCache(torch.cat(feats), torch.cat(toks), torch.cat(masks), torch.cat(labels),
                        names)


# ------------------------------------------------------------------------------------------------
