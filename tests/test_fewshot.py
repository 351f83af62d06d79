"""Few-shot references (models/fewshot.py, dataset/shots.py, test.py --k_shot, predict.py
--reference): the map against a brute-force NumPy computation, a reference scored against
itself, references only from the train split, batch-size invariance of a shot seed's results,
and every bad input's one line."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import test as test_script
from dataset.shots import draw_references, draw_shots, train_images
from dataset.data import load_meta
from models import AnomalyDetector, SettingsError
from models.errors import InputError
from models.fewshot import ReferenceBank, fewshot_map, nearest_distance
from models.noise import shared_noise
from tests.clip_factory import TINY_LAYERS
from utils.inference import predict_images

TINY = ["--image_size", "32", "--features_list", *map(str, TINY_LAYERS), "--sample_num", "2",
        "--no_progress"]


@pytest.fixture(scope="module")
def shots_root(tmp_path_factory):
    """Two classes with 5 train images each, and a dataset without train images."""
    from dataset.synthetic import write_standard

    root = str(tmp_path_factory.mktemp("shots"))
    write_standard(root, name="withtrain", classes=["pill", "wood"], size=40, n_train=5,
                   n_test_good=2, n_test_anomaly=3)
    write_standard(root, name="notrain", classes=["mesh"], size=40, n_train=0,
                   n_test_good=2, n_test_anomaly=2)
    return root


def _numpy_bilinear_align_corners(grid: np.ndarray, size: int) -> np.ndarray:
    """[G, G] -> [size, size], bilinear with the corner pixels on the corners."""
    g = grid.shape[0]
    pos = np.arange(size) * (g - 1) / (size - 1)
    lo = np.floor(pos).astype(int).clip(0, g - 1)
    hi = np.minimum(lo + 1, g - 1)
    w = pos - lo
    rows = grid[lo] * (1 - w)[:, None] + grid[hi] * w[:, None]            # [size, G]
    return rows[:, lo] * (1 - w)[None] + rows[:, hi] * w[None]


def _brute_force(tokens: list[np.ndarray], refs: list[np.ndarray], size: int) -> np.ndarray:
    """tokens: per layer [B, GG, V]; refs: per layer [K, GG, V] -> [B, size, size]."""
    b, gg, _ = tokens[0].shape
    g = int(round(gg ** 0.5))
    layer_maps = []
    for t, r in zip(tokens, refs):
        q = t / np.linalg.norm(t, axis=-1, keepdims=True)
        bank = r.reshape(-1, r.shape[-1])
        bank = bank / np.linalg.norm(bank, axis=-1, keepdims=True)
        sims = np.einsum("bpv,mv->bpm", q, bank)
        layer_maps.append(1.0 - sims.max(axis=-1))                       # [B, GG]
    mean = np.mean(layer_maps, axis=0).reshape(b, g, g)
    return np.stack([_numpy_bilinear_align_corners(m, size) for m in mean])


def test_fewshot_map_equals_numpy_brute_force_at_any_chunk():
    rng = np.random.default_rng(0)
    tokens = [rng.normal(size=(3, 16, 24)).astype(np.float32) for _ in range(2)]
    refs = [rng.normal(size=(2, 16, 24)).astype(np.float32) for _ in range(2)]
    expected = _brute_force([t.astype(np.float64) for t in tokens],
                            [r.astype(np.float64) for r in refs], 20)
    bank = ReferenceBank.from_tokens([torch.from_numpy(r) for r in refs], [1, 2], 20)
    for chunk in (1 << 24, 7, 1):      # one block; blocks of a few rows; one similarity at a time
        got = fewshot_map([torch.from_numpy(t) for t in tokens], bank, 20, chunk_elements=chunk)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    assert bank.count == 2 and bank.tokens[0].shape == (32, 24)
    # the map is a distance: it grows when the references are unlike the queries
    far = ReferenceBank.from_tokens([-torch.from_numpy(t[:1]) for t in tokens], [1, 2], 20)
    near = ReferenceBank.from_tokens([torch.from_numpy(t[:1]) for t in tokens], [1, 2], 20)
    image0 = [torch.from_numpy(t[:1]) for t in tokens]
    assert fewshot_map(image0, near, 20).abs().max() < 1e-5
    assert fewshot_map(image0, far, 20).mean() > 0.3


def test_nearest_distance_chunks_bound_queries_and_bank_rows():
    rng = np.random.default_rng(1)
    q = torch.from_numpy(rng.normal(size=(37, 8)).astype(np.float32))
    bank = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(53, 8))
                                                          .astype(np.float32)), dim=-1)
    whole = nearest_distance(q, bank)
    for chunk in (5, 53, 54, 200):
        torch.testing.assert_close(nearest_distance(q, bank, chunk_elements=chunk), whole)
    qn = torch.nn.functional.normalize(q, dim=-1)
    torch.testing.assert_close(whole, 1 - (qn @ bank.T).max(1).values)


def test_a_reference_scored_against_itself_has_a_zero_fewshot_map(det):
    torch.manual_seed(0)
    images = torch.randn(3, 3, 32, 32)
    bank = det.reference_bank(images[:1])
    noise = shared_noise(2, 3, det.model.prompt_context.shape[-1], seed=5)
    out = det.predict(images, "pill", noise=noise, references=bank)
    assert out["fewshot_map"].shape == (3, 32, 32)
    assert out["fewshot_map"][0].abs().max() < 1e-5                     # the reference itself
    assert out["fewshot_map"][1:].min() > 1e-3                           # other images
    # the combined map is the zero-shot map plus the weighted few-shot map
    plain = det.predict(images, "pill", noise=noise)
    torch.testing.assert_close(out["anomaly_map"], plain["anomaly_map"] + out["fewshot_map"])
    torch.testing.assert_close(out["image_score"], plain["image_score"])
    det.fewshot_weight = 0.5
    try:
        half = det.predict(images, "pill", noise=noise, references=bank)
    finally:
        det.fewshot_weight = 1.0
    torch.testing.assert_close(half["anomaly_map"],
                               plain["anomaly_map"] + 0.5 * out["fewshot_map"])
    # the spread over the samples does not move with the constant few-shot map; the spread
    # of the fused per-sample score sees it
    spread = det.predict(images, "pill", noise=noise, references=bank, return_std=True,
                         topk=[5, 5, 5])
    spread0 = det.predict(images, "pill", noise=noise, return_std=True, topk=[5, 5, 5])
    torch.testing.assert_close(spread["anomaly_map_std"], spread0["anomaly_map_std"])
    assert spread["score_std"].shape == (3,)


def test_reference_bank_takes_batches_paths_and_images(det, tmp_path):
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 256, (40, 30, 3), np.uint8) for _ in range(2)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(str(tmp_path / f"good{i}.png"))
        Image.fromarray(a).save(paths[-1])
    from_paths = det.reference_bank(paths)
    from_arrays = det.reference_bank(arrays)
    from_pil = det.reference_bank([Image.open(p) for p in paths])
    assert from_paths.paths == tuple(paths) and from_paths.count == 2
    for other in (from_arrays, from_pil):
        for a, b in zip(from_paths.tokens, other.tokens):
            torch.testing.assert_close(a, b)
    # leaving one out gives the bank of the others
    three = det.reference_bank([*paths, paths[0]])
    for k, others in enumerate(([paths[1], paths[0]], [paths[0], paths[0]], paths)):
        left = three.without(k)
        assert left.count == 2 and left.paths == tuple(others)
        for a, b in zip(left.tokens, det.reference_bank(others).tokens):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="cannot leave out reference 3 of 3"):
        three.without(3)
    # encoding in chunks gives the bank of one pass
    one = det.reference_bank(paths, chunk=1)
    for a, b in zip(from_paths.tokens, one.tokens):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="no reference images"):
        det.reference_bank([])
    with pytest.raises(InputError, match="cannot read image .*missing.png"):
        det.reference_bank([str(tmp_path / "missing.png")])
    other = AnomalyDetector(det.clip, det.model, image_size=32, sample_num=2,
                            layers=[4, 3, 2, 1])
    with pytest.raises(SettingsError, match=r"layers \[1, 2, 3, 4\] at 32 px"):
        other.predict(torch.zeros(1, 3, 32, 32), "pill", references=from_paths)


def test_references_are_read_upright_as_the_scored_images(det, tmp_path, monkeypatch):
    """A phone photo stored sideways with an EXIF orientation: predict.py, export.py and the
    API read a reference upright, as they read the images they score (--ignore_exif: as
    stored); so does AnomalyDetector.reference_bank (exif_transpose=False: as stored)."""
    import export
    from utils.inference import references_of

    stored = np.random.default_rng(8).integers(0, 256, (24, 40, 3), np.uint8)
    rotated = str(tmp_path / "sideways.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                         # rotate 90 degrees to view
    Image.fromarray(stored).save(rotated, exif=exif.tobytes())
    upright = str(tmp_path / "upright.png")
    Image.open(rotated).transpose(Image.Transpose.ROTATE_270).save(upright)
    as_stored = str(tmp_path / "stored.png")
    Image.fromarray(stored).save(as_stored)

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))

    want, plain = det.reference_bank([upright]), det.reference_bank([as_stored])
    assert not same(want, plain)
    assert same(det.reference_bank([rotated], exif_transpose=True), want)
    assert same(det.reference_bank([rotated]), want)
    assert same(det.reference_bank([rotated], exif_transpose=False), plain)
    assert same(references_of(det, [rotated]), want)
    assert same(predict.load_references(det, [rotated], True), want)
    assert same(predict.load_references(det, [rotated], False), plain)
    assert references_of(det, [rotated]).paths == (rotated,)
    # export.py bakes in the upright bank
    baked = {}

    def export_onnx(detector, name, out, references=None, **settings):
        baked["bank"] = references
        return SimpleNamespace(path=out, files=[out], size_bytes=0, seconds=0.0, metadata={})

    monkeypatch.setattr(det, "fewshot_weight", det.fewshot_weight)     # restored afterwards
    monkeypatch.setattr(export.AnomalyDetector, "from_files", lambda *a, **k: det)
    monkeypatch.setattr(export, "export_onnx", export_onnx)
    export.run(export.get_parser().parse_args([
        "--pretrained_path", "clip.pt", "--checkpoint_path", "ckpt.pth", "--class_name",
        "pill", "--out", str(tmp_path / "x.onnx"), "--reference", rotated]))
    assert same(baked["bank"], want)


@pytest.mark.parametrize("topk", [None, [5, 7]])
def test_several_maps_share_one_text_pass_and_equal_one_call_each(det, topk):
    """forward_features_shots (test.py's runs of several shot seeds) gives each map's outputs
    of forward_features bit for bit, spreads and per-sample fused scores included."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    features, tokens = det.encode_images(images)
    banks = {shot: det.reference_bank(torch.randn(k, 3, 32, 32,
                                                  generator=torch.Generator().manual_seed(shot)))
             for shot, k in ((0, 1), (1, 3))}
    maps = {None: None, **{shot: det.fewshot(tokens, bank) for shot, bank in banks.items()}}
    noise = shared_noise(det.sample_num, 2, det.model.prompt_context.shape[-1], 4)
    calls = []
    real = det.encode_text

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    det.encode_text = counted
    try:
        together = det.forward_features_shots(features, tokens, ["pill", "wood"], maps, noise,
                                              True, topk)
    finally:
        del det.encode_text
    assert len(calls) == 1 and list(together) == list(maps)
    for key, fewshot in maps.items():
        alone = det.forward_features(features, tokens, ["pill", "wood"], noise, True, topk,
                                     fewshot=fewshot)
        assert set(alone) == set(together[key])
        for name, value in alone.items():
            assert torch.equal(value, together[key][name]), (key, name)


def test_predict_images_with_references_equals_the_bank_path(det, tmp_path):
    rng = np.random.default_rng(4)
    good = [Image.fromarray(rng.integers(0, 256, (36, 36, 3), np.uint8)) for _ in range(2)]
    test = [Image.fromarray(rng.integers(0, 256, (36, 36, 3), np.uint8)) for _ in range(3)]
    bank = det.reference_bank(good)
    a = predict_images(det, test, "pill", seed=1, references=good)
    b = predict_images(det, test, "pill", seed=1, references=bank, batch_size=1)
    plain = predict_images(det, test, "pill", seed=1)
    for x, y, z in zip(a, b, plain):
        assert x["score"] == pytest.approx(y["score"], abs=1e-6)
        np.testing.assert_allclose(x["anomaly_map"], y["anomaly_map"], atol=1e-5)
        assert x["text_score"] == pytest.approx(z["text_score"], abs=1e-6)
        assert x["map_score"] > z["map_score"]          # the few-shot map only adds
        assert x["fewshot_map"].shape == (36, 36) and "fewshot_map" not in z
    # without the few-shot map (predict.py, the page): every other output the same
    lean = predict_images(det, test, "pill", seed=1, references=bank, return_fewshot=False)
    for x, y in zip(lean, a):
        assert set(x) == set(y) - {"fewshot_map"}
        assert x["score"] == y["score"] and np.array_equal(x["anomaly_map"], y["anomaly_map"])
    # a good image scored against itself gets the zero-shot map back
    self_ = predict_images(det, good[:1], "pill", seed=1, references=good[:1])[0]
    zero = predict_images(det, good[:1], "pill", seed=1)[0]
    np.testing.assert_allclose(self_["anomaly_map"], zero["anomaly_map"], atol=1e-5)


def test_shots_come_from_the_train_split_only_and_are_reproducible(shots_root):
    meta = load_meta(shots_root, "withtrain")
    test_paths = {e["img_path"] for entries in meta["test"].values() for e in entries}
    drawn = draw_references(shots_root, "withtrain", ["pill", "wood"], 3, [0, 1, 2])
    for shot, per_class in drawn.items():
        for name, paths in per_class.items():
            rel = [os.path.relpath(p, shots_root) for p in paths]
            assert len(set(rel)) == 3                                   # without replacement
            assert set(rel) <= set(train_images(meta, name))
            assert not set(rel) & test_paths
            assert all(f"/{name}/train/good/" in p for p in rel)
    assert drawn[0]["pill"] != drawn[1]["pill"]                        # the shot seed matters
    again = draw_references(shots_root, "withtrain", ["wood"], 3, [1])
    assert again[1]["wood"] == drawn[1]["wood"]                        # other classes do not
    paths = [f"p{i}" for i in range(10)]
    assert sorted(draw_shots(paths, 10, 0, "a")) == sorted(paths)
    assert draw_shots(paths, 4, 0, "a") == draw_shots(paths, 4, 0, "a")
    assert draw_shots(paths, 4, 0, "a") != draw_shots(paths, 4, 0, "b")


def test_k_shot_errors_name_the_class_or_dataset(shots_root):
    from dataset.errors import DatasetError

    with pytest.raises(DatasetError, match=r"--k_shot 6 needs 6 good train images per class, "
                                           r"but withtrain has fewer for: pill 5, wood 5"):
        draw_references(shots_root, "withtrain", ["pill", "wood"], 6, [0])
    with pytest.raises(DatasetError, match=r"notrain has no train images .*evaluate it "
                                           r"zero-shot"):
        draw_references(shots_root, "notrain", ["mesh"], 1, [0])


def _test_py(tiny_files, root, out, *extra):
    clip_path, ckpt = tiny_files
    return test_script.main(["--dataset", "withtrain", "--data_path", root,
                             "--checkpoint_path", ckpt, "--pretrained_path", clip_path, *TINY,
                             "--num_workers", "0", "--save_path", str(out), "--no_vis", *extra])


def test_k_shot_runs_do_not_depend_on_the_batch_size(tiny_files, shots_root, tmp_path):
    """Batch 1 and batch 4 compute the same maps to float32 rounding (a GEMM of another shape
    sums in another order): maps and text scores within tests.noise.MAP_NOISE, and each
    metric of test.py's files inside the interval that this noise allows (tests/noise.py:
    the rank metrics may move by more than the noise itself, never outside the interval)."""
    from tests.noise import api_outputs, assert_batchings_agree
    from utils.evaluate import reference_banks

    def references(dataset, det):
        drawn = draw_references(shots_root, "withtrain", dataset.class_names, 2, [0, 1])
        return reference_banks(det, dataset, drawn)

    args = ["--k_shot", "2", "--shot_seeds", "0", "1", "--seeds", "7"]
    assert _test_py(tiny_files, shots_root, tmp_path / "b1", *args, "--batch_size", "1") == 0
    assert _test_py(tiny_files, shots_root, tmp_path / "b4", *args, "--batch_size", "4") == 0
    api = {b: api_outputs(tiny_files, shots_root, "withtrain", b, 7, references=references)
           for b in (1, 4)}
    for shot in (0, 1):
        name = f"seed7_shot{shot}_results_withtrain.json"
        files = {b: json.loads((tmp_path / f"b{b}" / name).read_text()) for b in (1, 4)}
        for cls in ("pill", "wood"):
            assert_batchings_agree({b: files[b]["classes"][cls] for b in (1, 4)},
                                   {b: api[b][cls][(7, shot)] for b in (1, 4)}, "withtrain",
                                   where=f"{name} {cls}:")
    one = json.loads((tmp_path / "b1" / "results_withtrain.json").read_text())
    four = json.loads((tmp_path / "b4" / "results_withtrain.json").read_text())
    assert one["classes"].keys() == four["classes"].keys() and one["runs"] == four["runs"]
    # a run among several shot seeds (sharing the seed's prompt samples, text and maps) is
    # the run of its shot seed alone
    assert _test_py(tiny_files, shots_root, tmp_path / "alone", "--k_shot", "2", "--shot_seeds",
                    "1", "--seeds", "7", "--batch_size", "1") == 0
    alone = json.loads((tmp_path / "alone" / "results_withtrain.json").read_text())
    among = json.loads((tmp_path / "b1" / "seed7_shot1_results_withtrain.json").read_text())
    assert alone["classes"] == among["classes"]
    summary = json.loads((tmp_path / "b1" / "results_withtrain.json").read_text())
    assert summary["status"] == "complete" and summary["runs"] == [[7, 0], [7, 1]]
    refs = summary["references"]
    assert refs["k_shot"] == 2 and set(refs["paths"]) == {"0", "1"}
    assert all(len(p) == 2 and all("/train/good/" in x for x in p)
               for per_class in refs["paths"].values() for p in per_class.values())
    # the few-shot runs differ from the zero-shot one
    assert _test_py(tiny_files, shots_root, tmp_path / "zero", "--seed", "7") == 0
    zero = json.loads((tmp_path / "zero" / "results_withtrain.json").read_text())
    shot = json.loads((tmp_path / "b1" / "seed7_shot0_results_withtrain.json").read_text())
    assert zero["classes"]["pill"]["auroc_px"] != shot["classes"]["pill"]["auroc_px"]
    assert "references" not in zero


def test_test_py_k_shot_bad_input_is_one_line_and_writes_nothing(tiny_files, shots_root,
                                                                 tmp_path, capsys):
    out = tmp_path / "never"
    assert _test_py(tiny_files, shots_root, out, "--k_shot", "9") == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "--k_shot 9 needs 9 good train images per class" in errors[0]
    assert not out.exists()


def test_predict_py_reference_flag(tiny_files, tmp_path):
    rng = np.random.default_rng(5)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), np.uint8)).save(tmp_path / f"g{i}.png")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), np.uint8)).save(inputs / f"t{i}.png")
    clip_path, ckpt = tiny_files
    base = ["--pretrained_path", clip_path, "--checkpoint_path", ckpt, *TINY, "--input",
            str(inputs), "--class_name", "pill", "--no_overlay"]
    assert predict.main([*base, "--out", str(tmp_path / "o"), "--reference",
                         str(tmp_path / "g*.png")]) == 0
    result = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert result["references"]["n_images"] == 2
    assert sorted(result["references"]["paths"]) == sorted(str(tmp_path / f"g{i}.png")
                                                           for i in range(2))
    det = AnomalyDetector.from_files(clip_path, ckpt, image_size=32, layers=TINY_LAYERS,
                                     sample_num=2)
    expected = predict_images(det, sorted(str(p) for p in inputs.iterdir()), "pill", seed=111,
                              references=[str(tmp_path / f"g{i}.png") for i in range(2)])
    got = sorted(result["predictions"], key=lambda r: r["path"])
    for row, want in zip(got, expected):
        assert row["score"] == pytest.approx(want["score"], abs=1e-6)
    # a reference that cannot be read, or names nothing: one line, nothing written
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert predict.main([*base, "--out", str(tmp_path / "o2"), "--reference",
                         str(tmp_path / "bad.png")]) == 2
    assert not (tmp_path / "o2" / "predictions.csv").exists()
    assert predict.main([*base, "--out", str(tmp_path / "o3"), "--reference",
                         str(tmp_path / "nothing*.png")]) == 2
    assert not (tmp_path / "o3").exists()
