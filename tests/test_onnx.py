"""ONNX export (export.py, utils.export) and ONNX Runtime inference (utils.inference.OnnxDetector,
predict.py --onnx): parity with AnomalyDetector.predict on random weights, the metadata, the
checker, float16 weights, the one-line errors and the missing deploy extra.

Two files are exported per run of this module: the tiny detector by export.py (with
references, the spreads and external data), and a ViT-B/16 at 224 px (random weights of the
real shapes) traced once and written twice (float32, float16)."""

import csv
import os
import sys

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import export
import predict
from models import AnomalyDetector, BayesPFL
from models.errors import InputError, SettingsError
from models.fewshot import fewshot_map
from models.noise import shared_noise
from models.random_clip import geometry_kwargs, make_clip_state_dict
from models.weights import build_clip, sha256_of
from tests.clip_factory import TINY_LAYERS
from utils.export import (fp16_initializers, graph_fewshot_map, graph_scores, trace_detector,
                          write_onnx)
from utils.inference import OnnxDetector, predict_images
from utils.onnx_detector import providers_for
from utils.protocol import topk_for_class
from utils.provenance import code_version

CLASS, SEED, R = "metal_nut", 7, 2
TINY = ["--image_size", "32", "--features_list", *map(str, TINY_LAYERS), "--sample_num", str(R)]
TOL = 1e-4


def rgb(seed, h=40, w=30):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def save_images(folder, seeds, sizes=((40, 30), (24, 52), (33, 33))):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for seed, (h, w) in zip(seeds, sizes):
        paths.append(os.path.join(folder, f"{seed:03d}.png"))
        rgb(seed, h, w).save(paths[-1])
    return paths


def largest_differences(got: dict, want: dict) -> dict:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for key in want:
        assert got[key].shape == want[key].shape, key
    return {k: float((got[k].float() - want[k].float()).abs().max()) for k in want}


@pytest.fixture(scope="module")
def tiny_detector(tiny_files):
    clip_path, ckpt_path = tiny_files
    return AnomalyDetector.from_files(clip_path, ckpt_path, image_size=32, device="cpu",
                                      sample_num=R, layers=TINY_LAYERS)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    return save_images(str(tmp_path_factory.mktemp("references")), [90, 91])


@pytest.fixture(scope="module")
def tiny_export(tiny_files, references, tmp_path_factory):
    """The tiny detector exported by export.py: references, spreads, external data (40-50 s
    here, on 2 cores shared with other work at a load average near 10)."""
    clip_path, ckpt_path = tiny_files
    path = str(tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    assert export.main(["--pretrained_path", clip_path, "--checkpoint_path", ckpt_path,
                        "--class_name", CLASS, "--out", path, *TINY, "--seed", str(SEED),
                        "--reference", *references, "--uncertainty", "--external_data"]) == 0
    return path


# ------------------------------------------------------------------------------------------
# The traceable forms against the PyTorch path, without ONNX


def test_graph_scores_equal_the_detector_scoring(tiny_detector):
    det = tiny_detector
    g = torch.Generator().manual_seed(0)
    b, pairs = 3, det.model.prompt_num * R
    image_logits = 4 * torch.randn(b, 2 * pairs, generator=g)
    pixel_logits = [4 * torch.randn(b, 2 * pairs, 4, 4, generator=g) for _ in TINY_LAYERS]
    offset = torch.rand(b, 32, 32, generator=g)
    k = 20
    want = det.score(image_logits, pixel_logits, True, [k] * b, offset)
    got = graph_scores(image_logits, pixel_logits, det.model.prompt_num, 32, offset, True, k)
    assert max(largest_differences(got, want).values()) < 1e-6
    plain = graph_scores(image_logits, pixel_logits, det.model.prompt_num, 32)
    assert set(plain) == {"image_score", "anomaly_map"}
    assert torch.allclose(plain["anomaly_map"] + offset, got["anomaly_map"], atol=1e-6)


def test_graph_fewshot_map_equals_the_chunked_search(tiny_detector, references):
    det = tiny_detector
    bank = det.reference_bank(references)
    _, tokens = det.encode_images(torch.randn(3, 3, 32, 32, generator=torch.Generator()
                                              .manual_seed(1)))
    want = fewshot_map(tokens, bank, 32, chunk_elements=40)
    for chunk in (40, 10**6):        # several bank blocks, and one
        got = graph_fewshot_map(tokens, list(bank.tokens), 32, chunk)
        assert torch.allclose(got, want, atol=1e-6)
    assert float(want.std()) > 1e-3  # the map varies: the comparison can fail


# ------------------------------------------------------------------------------------------
# Tiny geometry: export.py, references, spreads, external data


@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_parity_with_references_and_spreads(tiny_export, tiny_detector, references, batch):
    det, onnx_det = tiny_detector, OnnxDetector(tiny_export)
    bank = det.reference_bank(references)
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
    k = min(topk_for_class(CLASS), 32 * 32)
    want = det.predict(x, CLASS, noise=shared_noise(R, batch, 64, SEED), return_std=True,
                       topk=[k] * batch, references=bank)
    got = onnx_det.predict(x, return_std=True, topk=[k] * batch)
    differences = largest_differences(got, want)
    assert max(differences.values()) < TOL, differences
    assert float(want["image_score"].std() if batch > 1 else want["anomaly_map"].std()) > 1e-3
    plain = onnx_det.predict(x, CLASS.replace("_", " "))   # the same wording, the same class
    assert set(plain) == {"image_score", "anomaly_map", "fewshot_map"}
    assert torch.equal(plain["anomaly_map"], got["anomaly_map"])


def test_tiny_file_metadata_checker_and_external_data(tiny_export, tiny_files, references):
    clip_path, ckpt_path = tiny_files
    assert os.path.isfile(tiny_export + ".data")
    onnx.checker.check_model(tiny_export, full_check=True)     # path-based: external data
    model = onnx.load(tiny_export, load_external_data=False)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert model.graph.input[0].name == "image" and batch_dim.dim_param
    assert [o.name for o in model.graph.output] == [
        "image_score", "anomaly_map", "fewshot_map", "anomaly_map_std", "image_score_std",
        "score_std"]
    meta = OnnxDetector(tiny_export).metadata
    assert meta["class_name"] == CLASS and meta["prompt"] == "X metal nut"
    assert (meta["seed"], meta["sample_num"], meta["image_size"]) == (SEED, R, 32)
    assert meta["stage"] == 2 and meta["layers"] == TINY_LAYERS
    assert meta["clip_sha256"] == sha256_of(clip_path)
    assert meta["checkpoint_sha256"] == sha256_of(ckpt_path)
    assert meta["version"] == code_version()["version"]
    assert meta["references"] == 2 and meta["reference_paths"] == references
    assert meta["fewshot_weight"] == 1.0 and meta["uncertainty"] is True
    assert meta["fp16_weights"] is False


def test_predict_images_takes_the_onnx_detector(tiny_export, tiny_detector, references,
                                                tmp_path):
    paths = save_images(str(tmp_path), [1, 2, 3])
    onnx_det = OnnxDetector(tiny_export)
    want = predict_images(tiny_detector, paths, CLASS, seed=SEED, references=references,
                          batch_size=2)
    got = predict_images(onnx_det, paths, CLASS, seed=SEED, batch_size=2)
    for w, g in zip(want, got):
        for key in ("score", "text_score", "map_score"):
            assert g[key] == pytest.approx(w[key], abs=TOL)
        assert np.abs(g["anomaly_map"] - w["anomaly_map"]).max() < TOL
        assert np.abs(g["fewshot_map"] - w["fewshot_map"]).max() < TOL
    with pytest.raises(SettingsError, match=r"^seed 5 was asked for but .* seed 7 baked in"):
        predict_images(onnx_det, paths, CLASS, seed=5)


def test_predict_onnx_csv_equals_predict(tiny_export, tiny_files, references, tmp_path):
    folder = str(tmp_path / "parts")
    save_images(folder, [11, 12, 13])
    clip_path, ckpt_path = tiny_files
    onnx_out, torch_out = str(tmp_path / "onnx"), str(tmp_path / "torch")
    assert predict.main(["--onnx", tiny_export, "--input", folder, "--out", onnx_out,
                         "--uncertainty", "--no_progress"]) == 0
    assert predict.main(["--pretrained_path", clip_path, "--checkpoint_path", ckpt_path, *TINY,
                         "--seed", str(SEED), "--class_name", CLASS, "--reference", *references,
                         "--input", folder, "--out", torch_out, "--uncertainty",
                         "--no_progress"]) == 0

    def rows(out):
        with open(os.path.join(out, "predictions.csv"), newline="") as f:
            return list(csv.DictReader(f))

    got, want = rows(onnx_out), rows(torch_out)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and g["path"] == w["path"]
        assert g["class_name"] == w["class_name"] == CLASS
        for key in ("score", "text_score", "map_score", "score_std"):
            assert float(g[key]) == pytest.approx(float(w[key]), abs=TOL), key
        for key in ("overlay", "uncertainty_overlay"):
            assert os.path.relpath(g[key], onnx_out) == os.path.relpath(w[key], torch_out)
            assert os.path.isfile(g[key])
    import json
    with open(os.path.join(onnx_out, "predictions.json")) as f:
        result = json.load(f)
    assert result["references"]["n_images"] == 2
    assert result["settings"]["onnx"]["metadata"]["seed"] == SEED
    assert result["provenance"]["weights"]["clip"] is None


def test_calibrating_on_the_files_own_references_warns(tiny_export, references, tmp_path,
                                                        capsys):
    """As on the PyTorch path: the references baked into the file, given as calibration
    images, have a few-shot map of 0, so the threshold comes out too low: one warning."""
    folder = str(tmp_path / "parts")
    save_images(folder, [31])
    calibrate = os.path.dirname(references[0])
    assert predict.main(["--onnx", tiny_export, "--input", folder, "--calibrate", calibrate,
                         "--out", str(tmp_path / "o"), "--no_overlay", "--no_progress"]) == 0
    err = capsys.readouterr().err
    assert "2 calibration image(s) are also references" in err


def test_settings_that_differ_from_the_file_are_one_line(tiny_export, tmp_path, capsys):
    folder = str(tmp_path / "parts")
    save_images(folder, [21])
    base = ["--onnx", tiny_export, "--input", folder, "--out", str(tmp_path / "o"),
            "--no_progress"]
    for extra, said in [
            (["--seed", "5"], "--seed 5 (the file has 7)"),
            (["--image_size", "64"], "--image_size 64 (the file has 32)"),
            (["--sample_num", "3", "--features_list", "2"],
             "--sample_num 3 (the file has 2); --features_list 2 (the file has 1 2 3 4)"),
            (["--class_name", "bottle"], "the class name 'bottle' differs from 'metal_nut'"),
            (["--reference", folder], "references are baked into the file at export"),
            (["--precision", "bf16"], "--precision bf16 applies to the PyTorch path")]:
        assert predict.main(base + extra) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and said in err, err
    det = OnnxDetector(tiny_export)
    with pytest.raises(SettingsError, match="'bottle' differs from 'metal_nut'"):
        det.predict(torch.zeros(1, 3, 32, 32), "bottle")
    with pytest.raises(InputError, match="the images are 64 px but .* exported for 32 px"):
        det.predict(torch.zeros(1, 3, 64, 64))
    with pytest.raises(SettingsError, match="not the draws baked into"):
        det.predict(torch.zeros(1, 3, 32, 32), noise=shared_noise(R, 1, 64, SEED + 1))
    det.predict(torch.zeros(2, 3, 32, 32), noise=shared_noise(R, 2, 64, SEED))   # its own
    with pytest.raises(SettingsError, match="has no NoSuchExecutionProvider"):
        OnnxDetector(tiny_export, providers=["NoSuchExecutionProvider"])


@pytest.mark.parametrize("words", [70, 80])      # past the prompt's room; past 77 tokens
def test_a_class_name_too_long_for_the_text_tower_is_one_line(tiny_files, tmp_path, capsys,
                                                              words):
    clip_path, ckpt_path = tiny_files
    out = tmp_path / "x.onnx"
    assert export.main(["--pretrained_path", clip_path, "--checkpoint_path", ckpt_path, *TINY,
                        "--class_name", "cat " * words, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "too long for the text tower" in err
    assert "Traceback" not in err and not os.path.exists(out)


def test_providers_for_the_device_setting():
    cpu_only, with_cuda = ["CPUExecutionProvider"], ["CUDAExecutionProvider",
                                                     "CPUExecutionProvider"]
    assert providers_for("cpu", with_cuda) == ["CPUExecutionProvider"]
    assert providers_for("auto", cpu_only) == ["CPUExecutionProvider"]
    assert providers_for("auto", with_cuda) == with_cuda
    assert providers_for("cuda:1", with_cuda) == with_cuda
    with pytest.raises(SettingsError, match="^--device cuda: this onnxruntime has no CUDA "
                                            "provider .* install onnxruntime-gpu"):
        providers_for("cuda", cpu_only)


def test_without_the_deploy_extra_one_line(tiny_files, tiny_export, tmp_path, monkeypatch,
                                           capsys):
    clip_path, ckpt_path = tiny_files
    monkeypatch.setitem(sys.modules, "onnx", None)          # import onnx raises ImportError
    assert export.main(["--pretrained_path", clip_path, "--checkpoint_path", ckpt_path,
                        "--class_name", CLASS, "--out", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[deploy]"' in err and "onnx" in err
    assert not os.path.exists(tmp_path / "x.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    save_images(str(tmp_path / "in"), [5])
    assert predict.main(["--onnx", tiny_export, "--input", str(tmp_path / "in"),
                         "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install -e ".[deploy]"' in err
    assert "onnxruntime" in err


# ------------------------------------------------------------------------------------------
# ViT-B/16 at 224 px, random weights of the real shapes


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    """A ViT-B/16 detector at 224 px (random CLIP, Bayes-PFL heads spread out so that maps
    and scores vary) traced once and written as float32 and float16 files: 90-100 s here, on
    2 cores shared with other work at a load average near 10 (the whole module: 190-300 s of
    wall time there, about 70 s of CPU time)."""
    clip = build_clip(make_clip_state_dict(seed=3, **geometry_kwargs("ViT-B-16")),
                      image_size=224).requires_grad_(False).eval()
    torch.manual_seed(3)
    model = BayesPFL.from_clip(clip, layers=[3, 6, 9, 12]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("RCA.", "class_mapping", "image_mapping", "fuse.")) \
                    and p.dim() > 1:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)
        model.temperature_pixel.fill_(2.5)
        model.temperature_image.fill_(3.0)
    det = AnomalyDetector(clip, model, image_size=224, sample_num=R, stage=2,
                          layers=[3, 6, 9, 12])
    traced = trace_detector(det, "bottle", seed=SEED)
    folder = tmp_path_factory.mktemp("vit_b")
    fp32 = write_onnx(traced, str(folder / "b16.onnx"))
    fp16 = write_onnx(traced, str(folder / "b16_fp16.onnx"), fp16=True)
    del traced
    yield det, fp32, fp16
    for result in (fp32, fp16):
        for path in result.files:
            os.remove(path)


@pytest.mark.parametrize("batch", [1, 3])
def test_vit_b16_parity(vit_b, batch):
    det, fp32, _ = vit_b
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(10 + batch))
    want = det.predict(x, "bottle", noise=shared_noise(R, batch, 512, SEED))
    got = OnnxDetector(fp32.path).predict(x, "bottle")
    differences = largest_differences(got, want)
    assert max(differences.values()) < TOL, differences
    assert float(want["anomaly_map"].std()) > 1e-3
    if batch > 1:
        assert float(want["image_score"].std()) > 1e-4
    with pytest.raises(SettingsError, match="exported without the spreads"):
        OnnxDetector(fp32.path).predict(x, return_std=True)


def test_vit_b16_fp16_file_is_half_and_close(vit_b):
    _, fp32, fp16 = vit_b
    assert len(fp32.files) == len(fp16.files) == 1           # under 2 GiB: one file each
    ratio = fp16.size_bytes / fp32.size_bytes
    assert 0.45 < ratio < 0.55, ratio
    onnx.checker.check_model(fp16.path)
    assert fp16.metadata["fp16_weights"] and not fp32.metadata["fp16_weights"]
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    want = OnnxDetector(fp32.path).predict(x)
    got = OnnxDetector(fp16.path).predict(x)
    differences = largest_differences(got, want)
    # float16 rounding of the Bayes-PFL weight matrices (the random CLIP values are float16
    # already); 1.6e-5 (scores) and 2.1e-5 (maps) at ViT-L/14-336 (docs/performance.md)
    assert 0 < max(differences.values()) < 1e-3, differences


def test_fp16_initializers_keep_the_graph_valid(tiny_export):
    model = onnx.load(tiny_export)
    before = {i.name for i in model.graph.initializer}
    converted = fp16_initializers(model, min_elements=1024)
    assert converted > 0
    halves = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) == converted and all(i.name.endswith("__fp16") for i in halves)
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.name.endswith("__cast")]
    assert {n.output[0] for n in casts} <= before and len(casts) == converted
    onnx.checker.check_model(model)
