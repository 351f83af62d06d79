"""The benchmark scripts: argument handling and a tiny-geometry CPU run of each."""

import numpy as np
import pytest
import torch

from benchmarks import evaluation_memory, inference, metrics, pipeline, train_step
from benchmarks import onnx as onnx_benchmark
from benchmarks.common import default_image_size, default_layers

TINY = ["--geometry", "tiny", "--image_size", "28", "--iters", "1", "--warmup", "0"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def test_defaults_follow_the_geometry():
    assert default_layers(24) == [6, 12, 18, 24]
    assert default_layers(12) == [3, 6, 9, 12]
    assert default_layers(4) == [1, 2, 3, 4]
    assert default_image_size(14) == 518
    assert default_image_size(16) == 512


def test_inference_tiny_fp32(capsys):
    assert inference.main(TINY + ["--sample_num", "2", "--class_name", "bottle", "pcb1",
                                  "--batch_size", "2"]) == 0
    out = capsys.readouterr().out
    for part in ("image tower", "prompt sampling", "text tower", "heads", "scoring",
                 "predict (end to end)", "images/s", "peak memory"):
        assert part in out, part
    # N 3 x R 2 = 6 pairs; "pcb1" is the longest text: [SOS] + 5 + 2 x (5 + 3 + 1) positions
    assert "text tower work per image: 6 sequences x 24 positions = 144" in out
    assert "vs fp32" not in out
    assert inference.main(TINY + ["--sample_num", "2", "--class_name", "bottle", "pcb1",
                                  "--batch_size", "2", "--text", "cut"]) == 0
    assert "12 sequences x 15 positions" in capsys.readouterr().out


def test_inference_seeds_share_the_image_tower(capsys):
    assert inference.main(TINY + ["--sample_num", "2", "--seeds", "3"]) == 0
    assert "3 seeds sharing the image tower" in capsys.readouterr().out


def test_inference_times_the_fewshot_map(capsys):
    assert inference.main(TINY + ["--sample_num", "2", "--k_shot", "4"]) == 0
    out = capsys.readouterr().out
    assert "few-shot map, K = 4 references:" in out and "of the zero-shot predict" in out


def test_inference_tiny_bf16_compares_with_fp32(capsys):
    assert inference.main(TINY + ["--sample_num", "1", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "bf16 vs fp32, same inputs and noise: max abs difference" in out


def test_train_step_tiny(capsys):
    assert train_step.main(TINY + ["--batch_size", "2"]) == 0
    out = capsys.readouterr().out
    for part in ("text cut (default, shared prefix packed)", "one sequence per prompt",
                 "text at 77 positions", "ratio cut / full", "ratio cut unpacked / full",
                 "(a) image tower s", "(b) Bayes-PFL step s"):
        assert part in out, part
    assert "text at 77 positions: 6 sequences x 77 positions = 462" in out
    assert "shared prefix packed): 3 sequences x 20 positions = 60" in out


@NO_CUDA
@pytest.mark.parametrize("script", [inference, train_step])
def test_cuda_without_cuda_is_a_clear_error(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(TINY + ["--device", "cuda"])
    assert e.value.code == 2
    assert "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--device", "mps"], "only cpu and cuda"),
    (["--device", "nonsense"], "not a device name"),
    (["--tf32"], "CUDA matmuls only"),
    (["--image_size", "30"], "not a multiple of the patch"),
    (["--layers", "9"], "--layers must lie within 1..4"),
    (["--iters", "0"], "--iters must be at least 1"),
])
def test_argument_errors(extra, message, capsys):
    with pytest.raises(SystemExit) as e:
        inference.main(TINY + extra)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inference_tiny_cuda(capsys):
    assert inference.main(TINY + ["--device", "cuda", "--sample_num", "2", "--tf32"]) == 0
    assert "CUDA allocated" in capsys.readouterr().out


def test_official_pro_loop_equals_the_vectorised_form():
    from utils.metrics import aupro_official

    masks, maps = metrics.make_class(6, 48, seed=2)
    value, done, total = metrics.official_pro_loop(masks, maps)
    assert done == total >= 200
    assert value == pytest.approx(aupro_official(masks, maps), abs=1e-12)
    partial, done, total = metrics.official_pro_loop(masks, maps, max_thresholds=5)
    assert partial is None and done == 5


def test_metrics_benchmark_prints_both_ratios(capsys):
    metrics.main(["--n", "4", "--size", "48", "--repeat", "1", "--no-sklearn",
                  "--official_subset", "4"])
    out = capsys.readouterr().out
    assert "official loop (as its code runs), 4 of" in out
    assert "faster than the official function (extrapolated linearly" in out
    assert "faster than its vectorised form" in out


def test_evaluation_memory_argument_check(capsys):
    with pytest.raises(SystemExit):
        evaluation_memory.main(["--image_size", "100"])
    assert "multiple of 14" in capsys.readouterr().err


def test_make_batch_labels_follow_masks():
    import argparse

    args = argparse.Namespace(seed=0, batch_size=4, image_size=28, class_name=["a", "b"])
    batch = train_step.make_batch(args)
    assert batch["label"].tolist() == [1, 0, 1, 0]
    assert np.array_equal(batch["mask"].flatten(1).amax(1).numpy() > 0,
                          batch["label"].numpy() == 1)
    assert batch["cls_name"] == ["a", "b", "a", "b"]


def test_onnx_tiny_against_pytorch(capsys):
    """Export, float16 and int8 files, timings and differences (about 35 s here, on a shared
    machine)."""
    assert onnx_benchmark.main(TINY + ["--sample_num", "1"]) == 0
    out = capsys.readouterr().out
    assert "export: trace and conversion" in out and "int8 quantisation" in out
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines()
            if line.startswith(("PyTorch", "ONNX Runtime"))}
    assert {"PyTorch", "ONNX Runtime, float32", "ONNX Runtime, float16 weights",
            "ONNX Runtime, dynamic int8"} <= set(rows)
    fp32 = rows["ONNX Runtime, float32"]
    assert float(fp32[-1]) < 1e-4 and float(fp32[-2]) < 1e-4      # maps, scores
    assert "x PyTorch's time per image" in out


def test_onnx_benchmark_takes_fp32_only(capsys):
    with pytest.raises(SystemExit) as e:
        onnx_benchmark.main(TINY + ["--precision", "bf16"])
    assert e.value.code == 2
    assert "the files compute in float32" in capsys.readouterr().err


def test_pipeline_tiny_with_and_without_pictures(capsys):
    assert pipeline.main(["--n", "6", "--classes", "2", "--image_size", "56", "--batch_size",
                          "2", "--workers", "0", "--picture_workers", "1", "--sample_num",
                          "2", "--gpu_forward_ms", "5"]) == 0
    out = capsys.readouterr().out
    for part in ("read (dataset __getitem__, timed alone)", "model forward", "class metrics",
                 "picture hand-over", "main process outside the forward", "pictures (draw",
                 "images/s: pictures off", "pictures on", "target (CPU time), pictures off",
                 "target (wall time)", "estimate for 16 cores", "GPU forward 200",
                 "without pictures"):
        assert part in out, part
    assert "6 images in 2 classes, 56 px maps" in out


def test_pipeline_argument_errors(capsys):
    for argv, message in ((["--image_size", "100"], "multiple of 14"),
                          (["--classes", "9"], "--classes must lie within 1..8"),
                          (["--n", "4", "--classes", "2"], "at least 3 images each"),
                          (["--workers", "-1"], "--workers must be at least 0")):
        with pytest.raises(SystemExit) as e:
            pipeline.main(argv)
        assert e.value.code == 2
        assert message in capsys.readouterr().err
