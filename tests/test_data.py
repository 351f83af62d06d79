"""Tests of dataset/data.py: preprocessing, labels, masks, augmentation, mosaic, errors, loaders."""

import json
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from dataset.data import (
    CLIP_MEAN,
    CLIP_STD,
    AnomalyDataset,
    DatasetError,
    collate,
    make_loader,
    preprocess_image,
    preprocess_mask,
    sample_seed,
)
from dataset.augment import augment_rgb
from dataset.synthetic import write_standard

CLASSES = ["pill", "weave"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Standard-layout synthetic data: 2 classes, 64 px, 2 good + 4 anomalous test images each."""
    out = tmp_path_factory.mktemp("synthetic")
    write_standard(str(out), name="synthetic", classes=CLASSES, seed=0, size=64, n_train=1,
                   n_test_good=2, n_test_anomaly=4)
    return str(out)


def _meta(root, name="synthetic"):
    with open(os.path.join(root, f"meta_{name}.json")) as handle:
        return json.load(handle)


def _write_meta(root, name, test):
    with open(os.path.join(root, f"meta_{name}.json"), "w") as handle:
        json.dump({"train": {}, "test": test}, handle)


def _sample(img_path, mask_path="", cls="square", anomaly=1):
    return {"img_path": img_path, "mask_path": mask_path, "cls_name": cls,
            "specie_name": "anomaly" if anomaly else "good", "dataset_name": "x",
            "anomaly": anomaly}


def _reference_image(path, size):
    transform = transforms.Compose([
        transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    return transform(Image.open(path).convert("RGB"))


def _reference_mask(path, size):
    grey = np.array(Image.open(path).convert("L"))
    binary = Image.fromarray(np.where(grey > 0, 255, 0).astype(np.uint8))
    resized = transforms.Resize((size, size), interpolation=InterpolationMode.BILINEAR)(binary)
    return (transforms.ToTensor()(resized) > 0.5).float()


# ----------------------------------------------------------------------------------------------
# Items, preprocessing, labels
# ----------------------------------------------------------------------------------------------


def test_items_shapes_labels_and_masks(root):
    dataset = AnomalyDataset(root, "synthetic", image_size=64)
    assert len(dataset) == 2 * (2 + 4)
    assert not dataset.augment and dataset.mosaic_prob == 0.0
    meta = _meta(root)["test"]
    expected_paths = [os.path.join(root, s["img_path"]) for c in sorted(meta) for s in meta[c]]
    assert [s["img_path"] for s in dataset.samples] == expected_paths
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, 64, 64) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert isinstance(item["label"], int) and item["label"] in (0, 1)
        assert item["label"] == int(item["mask"].sum() > 0)
        assert item["specie_name"] == ("anomaly" if item["label"] else "good")
        assert isinstance(item["cls_name"], str) and os.path.isfile(item["img_path"])


def test_preprocessing_matches_pil_and_torchvision(root):
    dataset = AnomalyDataset(root, "synthetic", image_size=48)
    anomalous = [i for i, s in enumerate(dataset.samples) if s["label"] == 1]
    for index in (0, anomalous[0], anomalous[-1]):
        item = dataset[index]
        sample = dataset.samples[index]
        assert torch.equal(item["image"], _reference_image(sample["img_path"], 48))
        if sample["label"]:
            assert torch.equal(item["mask"], _reference_mask(sample["mask_path"], 48))
    path = dataset.samples[0]["img_path"]
    assert torch.equal(preprocess_image(Image.open(path), 48), _reference_image(path, 48))


def test_mask_binarisation(tmp_path):
    # faint labels (value 3) count as foreground at full size; a lone pixel vanishes when shrunk
    grey = np.zeros((40, 40), np.uint8)
    grey[8:20, 10:30] = 3
    grey[35, 35] = 255
    pil_mask = Image.fromarray(grey)
    same_size = preprocess_mask(pil_mask, 40)
    assert same_size.shape == (1, 40, 40)
    assert torch.equal(same_size[0].bool(), torch.from_numpy(grey > 0))
    small = preprocess_mask(pil_mask, 20)
    assert torch.equal(small, _reference_mask_from_array(grey, 20))
    assert small[0, 4:10, 5:15].all() and small[0, 17, 17] == 0
    assert set(small.unique().tolist()) <= {0.0, 1.0}


def _reference_mask_from_array(grey, size):
    binary = Image.fromarray(np.where(grey > 0, 255, 0).astype(np.uint8))
    resized = binary.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(resized) / 255.0 > 0.5).float()[None]


def test_class_filter_and_unknown_class(root):
    dataset = AnomalyDataset(root, "synthetic", image_size=32, class_names=["weave"])
    assert dataset.class_names == ["weave"] and len(dataset) == 6
    assert {s["cls_name"] for s in dataset.samples} == {"weave"}
    with pytest.raises(DatasetError, match="meta_synthetic.json") as error:
        AnomalyDataset(root, "synthetic", image_size=32, class_names=["weave", "carpet"])
    assert "'carpet'" in str(error.value) and "pill, weave" in str(error.value)


def test_placeholders_refused_in_test_split_and_classification_only(root, tmp_path):
    meta = _meta(root)
    placeholder = {"img_path": "", "mask_path": "", "cls_name": "pill", "specie_name": "good",
                   "dataset_name": "", "anomaly": 0}
    # placeholders belong to the "train" split (never read); in "test" an entry without its
    # image is an error naming it, not a silently smaller test set
    _write_meta(root, "copy", {"pill": [placeholder] + meta["test"]["pill"]})
    with pytest.raises(DatasetError, match=r"Entry 0 of class 'pill' .* has no img_path"):
        AnomalyDataset(root, "copy", image_size=32)
    test = {"pill": meta["test"]["pill"]}
    for name in ("copy", "HeadCT"):
        _write_meta(root, name, test)
    dataset = AnomalyDataset(root, "copy", image_size=32)
    assert len(dataset) == len(meta["test"]["pill"])
    assert all(s["img_path"] != root for s in dataset.samples)

    for dataset in (AnomalyDataset(root, "HeadCT", image_size=32),
                    AnomalyDataset(root, "copy", image_size=32, classification_only=True)):
        assert dataset.classification_only
        items = [dataset[i] for i in range(len(dataset))]
        assert sum(item["label"] for item in items) == 4
        assert all(item["mask"].sum() == 0 for item in items)


def test_mode_defaults(root):
    train = AnomalyDataset(root, "synthetic", mode="train", image_size=32)
    assert train.augment and train.mosaic_prob == 0.0
    off = AnomalyDataset(root, "synthetic", mode="train", image_size=32, augment=False)
    assert not off.augment
    _write_meta(root, "mvtec", _meta(root)["test"])
    assert AnomalyDataset(root, "mvtec", mode="train", image_size=32).mosaic_prob == 0.4
    assert AnomalyDataset(root, "mvtec", mode="test", image_size=32).mosaic_prob == 0.0


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_missing_meta(tmp_path):
    with pytest.raises(DatasetError) as error:
        AnomalyDataset(str(tmp_path), "visa")
    message = str(error.value)
    assert os.path.join(str(tmp_path), "meta_visa.json") in message
    assert f"python dataset/make_meta.py --data_root {tmp_path} --dataset visa" in message


def test_unreadable_image_missing_mask_and_empty_class(tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "ok.bmp")
    (tmp_path / "broken.bmp").write_bytes(b"not an image at all")
    _write_meta(str(tmp_path), "bad", {"square": [
        _sample("broken.bmp", anomaly=0),
        _sample("ok.bmp", "gone.png", anomaly=1),
    ]})
    dataset = AnomalyDataset(str(tmp_path), "bad", image_size=16)
    with pytest.raises(DatasetError, match="broken.bmp"):
        dataset[0]
    with pytest.raises(DatasetError, match="gone.png"):
        dataset[1]
    # without ground truth the anomalous sample is fine (zero mask, label kept)
    item = AnomalyDataset(str(tmp_path), "bad", image_size=16, classification_only=True)[1]
    assert item["label"] == 1 and item["mask"].sum() == 0

    # an unreadable mask is the same DatasetError read with its image or alone (validation)
    (tmp_path / "torn.png").write_bytes(b"not a mask either")
    _write_meta(str(tmp_path), "torn", {"square": [_sample("ok.bmp", "torn.png", anomaly=1)]})
    dataset = AnomalyDataset(str(tmp_path), "torn", image_size=16)
    for read in (lambda: dataset[0], lambda: dataset.read_full_mask(0)):
        with pytest.raises(DatasetError, match="cannot read mask .*torn.png"):
            read()

    _write_meta(str(tmp_path), "empty", {"square": [_sample("ok.bmp", anomaly=0)], "hollow": []})
    with pytest.raises(DatasetError, match="'hollow'"):
        AnomalyDataset(str(tmp_path), "empty")
    assert len(AnomalyDataset(str(tmp_path), "empty", class_names=["square"])) == 1

    _write_meta(str(tmp_path), "label", {"square": [dict(_sample("ok.bmp"), anomaly=2)]})
    with pytest.raises(DatasetError, match="anomaly=2"):
        AnomalyDataset(str(tmp_path), "label")


# ----------------------------------------------------------------------------------------------
# Augmentation and mosaic: at the original resolution, before the resize
# ----------------------------------------------------------------------------------------------


def _square(height=40, width=70, colour=(255, 200, 120)):
    image = np.zeros((height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.uint8)
    image[8:20, 30:50] = colour
    mask[8:20, 30:50] = 255
    return image, mask


def _shift_any(mask, radius):
    """Binary dilation by a (2r+1)^2 square, numpy only."""
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def test_training_item_is_the_official_pipeline(tmp_path):
    """A training item = augment the full-size image (RGB -> BGR -> albumentations semantics
    -> RGB) with the sample's own draws, then resize: rebuilt here from the pieces."""
    image, mask = _square()
    Image.fromarray(image).save(tmp_path / "square.png")
    Image.fromarray(mask).save(tmp_path / "square_mask.png")
    _write_meta(str(tmp_path), "square", {"square": [_sample("square.png", "square_mask.png")]})
    dataset = AnomalyDataset(str(tmp_path), "square", mode="train", image_size=32, seed=11)
    seen_k = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[0]
        rng = random.Random(sample_seed(11, epoch, 0))
        rgb, out_mask, params = augment_rgb(image, mask, rng)
        seen_k.add(params.k)
        assert torch.equal(item["image"], preprocess_image(Image.fromarray(rgb), 32))
        assert torch.equal(item["mask"], preprocess_mask(out_mask, 32))
        assert torch.equal(dataset[0]["image"], item["image"])       # the same draws again
    assert len(seen_k) > 1                                         # the draws vary by epoch
    # resizing first and augmenting the 32 x 32 image (the old order) gives another input
    small = np.asarray(Image.fromarray(image).resize((32, 32), Image.BICUBIC))
    dataset.set_epoch(0)
    rng = random.Random(sample_seed(11, 0, 0))
    rgb, _, _ = augment_rgb(small, np.zeros((32, 32), np.uint8), rng)
    assert not torch.equal(dataset[0]["image"], preprocess_image(Image.fromarray(rgb), 32))


def test_augmentation_keeps_image_and_mask_aligned(tmp_path):
    image, mask = _square(48, 48, colour=(255, 255, 255))     # white stays bright under jitter
    Image.fromarray(image).save(tmp_path / "square.bmp")
    Image.fromarray(mask).save(tmp_path / "square.png")
    _write_meta(str(tmp_path), "square", {"square": [_sample("square.bmp", "square.png")]})
    dataset = AnomalyDataset(str(tmp_path), "square", mode="train", image_size=48)
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    for epoch in range(12):
        dataset.set_epoch(epoch)
        item = dataset[0]
        white = ((item["image"] * std + mean)[0] > 0.5).numpy()
        marked = item["mask"][0].bool().numpy()
        # one geometric transform for both: bilinear image vs nearest mask, blur and noise on
        # the image only, so they agree but for the outline (and thin mirrored slivers)
        assert (white & marked).sum() >= 0.8 * (white | marked).sum()
        assert not (marked & ~_shift_any(white, 3)).sum() > 0.05 * marked.sum()


def test_mask_and_image_of_different_sizes_is_one_error(tmp_path):
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((20, 96), 255, np.uint8)).save(tmp_path / "a_mask.png")
    _write_meta(str(tmp_path), "bad", {"a": [_sample("a.png", "a_mask.png", cls="a")]})
    for mode in ("test", "train"):
        with pytest.raises(DatasetError) as error:
            AnomalyDataset(str(tmp_path), "bad", mode=mode, image_size=16)[0]
        message = str(error.value)
        assert "a_mask.png" in message and "a.png" in message and "96 x 20" in message
        assert "48 x 48" in message and "\n" not in message


def test_mosaic_pastes_four_full_size_images_with_replacement(root):
    size = 40
    dataset = AnomalyDataset(root, "synthetic", mode="train", image_size=size, augment=False,
                             mosaic_prob=1.0, seed=3)
    by_path = {s["img_path"]: s for s in dataset.samples}
    repeated = False
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for index in (0, len(dataset) - 1):                   # a good and an anomalous sample
            item = dataset[index]
            assert item["label"] == 1 and item["specie_name"] == "mosaic"
            paths = item["img_path"].split("|")
            assert len(paths) == 4
            repeated |= len(set(paths)) < 4
            sources = [by_path[p] for p in paths]
            assert all(s["label"] == 1 and s["cls_name"] == item["cls_name"] for s in sources)
            # rebuild: full-size paste into a 2W x 2H canvas, then the resize
            tiles = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
            h, w = tiles[0].shape[:2]
            canvas = np.zeros((2 * h, 2 * w, 3), np.uint8)
            canvas_mask = np.zeros((2 * h, 2 * w), np.uint8)
            for position, (tile, source) in enumerate(zip(tiles, sources)):
                top, left = (position // 2) * h, (position % 2) * w
                canvas[top:top + h, left:left + w] = tile
                grey = np.asarray(Image.open(source["mask_path"]).convert("L"))
                canvas_mask[top:top + h, left:left + w] = np.where(grey > 0, 255, 0)
            assert torch.equal(item["image"], _reference_image_pil(Image.fromarray(canvas), size))
            assert torch.equal(item["mask"], _reference_mask_from_array(canvas_mask, size))
    assert repeated                   # drawn with replacement: a repeat shows up in 12 mosaics


def _reference_image_pil(image, size):
    transform = transforms.Compose([
        transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    return transform(image)


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------


def _batches(dataset, num_workers, seed):
    loader = make_loader(dataset, batch_size=4, shuffle=True, num_workers=num_workers, seed=seed)
    assert loader.pin_memory == torch.cuda.is_available()
    return list(loader)


def _same(first, second):
    return all(torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
               and a["img_path"] == b["img_path"] for a, b in zip(first, second))


def test_loader_collate_and_seeded_determinism(root):
    dataset = AnomalyDataset(root, "synthetic", mode="train", image_size=32, mosaic_prob=0.3,
                             seed=5)
    first = _batches(dataset, 0, seed=7)
    second = _batches(dataset, 0, seed=7)
    assert _same(first, second)
    batch = first[0]
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].shape == (4, 1, 32, 32)
    assert batch["label"].dtype == torch.long and batch["label"].shape == (4,)
    assert isinstance(batch["cls_name"], list) and isinstance(batch["img_path"][0], str)

    # the worker count changes nothing: each sample's draws come from (seed, epoch, index)
    workers = _batches(dataset, 2, seed=7)
    assert _same(workers, first)
    assert not _same(workers, _batches(dataset, 2, seed=8))       # another order
    dataset.set_epoch(1)
    assert not _same(_batches(dataset, 0, seed=7), first)         # other draws


def test_collate_keeps_strings():
    items = [{"image": torch.zeros(3, 2, 2), "label": 1, "cls_name": "a b", "score": 0.5},
             {"image": torch.ones(3, 2, 2), "label": 0, "cls_name": "c", "score": 1.5}]
    batch = collate(items)
    assert batch["image"].shape == (2, 3, 2, 2)
    assert batch["label"].tolist() == [1, 0] and batch["cls_name"] == ["a b", "c"]
    assert batch["score"] == [0.5, 1.5]
