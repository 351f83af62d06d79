"""The inspection page: a local web page to score images, look at their heat maps and set the
threshold, on Gradio (``pip install -e ".[app]"``).

    python app.py --pretrained_path pretrained_weight/ViT-L-14-336px.pt \
        --checkpoint_path bayes_weight/train_visa.pth
    python app.py          # after `python demo.py`: the demo's random-weight files

Drop images, type the class name, optionally add good reference images (few-shot), press
"Score". Each image gets its heat-map overlay at its original size, its score and its verdict
at the threshold; moving the threshold decides again without scoring again. The scores and
maps are those of ``utils.inference.predict_images`` with the page's settings (R samples,
seed), the CSV and JSON downloads those of predict.py.

Safe by default: the page binds to 127.0.0.1 (``--host`` to change), makes no public link
(``--share`` to make one), and makes no outbound call (Gradio's analytics and version check,
Hugging Face telemetry and Google-hosted fonts are off). Uploads and results live in one
temporary folder removed when the page stops (normal exit, Ctrl-C, SIGTERM). A file over
``--max_file_mb`` or a run of more than ``--max_images`` images is refused with one line.
"""

from __future__ import annotations

import argparse
import copy
import html
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

from dataset.registry import REGISTRY
from models import AnomalyDetector
from models.noise import check_seed
from models.errors import InputError, SettingsError, UserError, WeightsError
from models.imaging import to_pil_image
from predict import load_detector
from utils.cli import (DEFAULT_CHECKPOINT, DEFAULT_CLIP, Parser, add_model_arguments,
                       add_runtime_arguments, fail, interrupt_on_sigterm, non_negative_float,
                       port_int, positive_int, seed_int)
from utils.inference import (DECISION_RULE, STD_SCALE, calibrate_threshold, decide,
                             prediction_row, predict_images, predictions_record,
                             references_of, save_overlay, write_outputs)
from utils.misc import setup_logging
from utils.provenance import provenance

log = logging.getLogger("bayes_pfl")

# Without weight flags: the files `python demo.py` writes (random weights; the checkpoint
# records the demo's model settings, 224 px and layers 3 6 9 12, which the loader reads).
DEMO_CLIP = os.path.join("demo_output", "clip_random.pt")
DEMO_CHECKPOINT = os.path.join("demo_output", "train", "final.pth")
# Set before Gradio (and huggingface_hub) are imported: no analytics and no version check
# (both api.gradio.app), no Hugging Face telemetry or hub calls. The launch turns off the
# rest: the share tunnel, server-side rendering (a Node server), the run history (which can
# save to a Hugging Face bucket), the monitoring endpoint.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
# System fonts only: Gradio's themes may fetch theirs from fonts.googleapis.com.
FONTS = ["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "Menlo", "Consolas", "monospace"]
TABLE_HEADERS = ["name", "score", "score_std", "verdict"]
THRESHOLD_STEP = 1e-6
UNITS_MB = 1024 * 1024


def class_suggestions() -> list[str]:
    """The class names of the registry's datasets that fix one (MVTec-AD, VisA), sorted."""
    return sorted({name for info in REGISTRY.values() for name in (info.classes or ())})


# --------------------------------------------------------------------------------------------
# Weights


@dataclass
class Weights:
    """The files the page runs on; ``demo``: the random-weight files of demo.py."""
    clip: str
    checkpoint: str
    demo: bool


def choose_weights(pretrained_path: str | None, checkpoint_path: str | None) -> Weights:
    """The weight files: those given (a missing one: predict.py's default), else the demo's
    when both exist, else one WeightsError saying how to get either."""
    if pretrained_path is None and checkpoint_path is None:
        if os.path.isfile(DEMO_CLIP) and os.path.isfile(DEMO_CHECKPOINT):
            return Weights(DEMO_CLIP, DEMO_CHECKPOINT, demo=True)
        raise WeightsError(
            f"no weights given and no demo files ({DEMO_CLIP}, {DEMO_CHECKPOINT}): pass "
            "--pretrained_path and --checkpoint_path (real weights: pretrained_weight/README.md, "
            "bayes_weight/README.md) or run `python demo.py` first for random-weight demo files")
    return Weights(pretrained_path or DEFAULT_CLIP, checkpoint_path or DEFAULT_CHECKPOINT,
                   demo=False)


def with_sample_num(detector: AnomalyDetector, sample_num: int) -> AnomalyDetector:
    """The detector drawing ``sample_num`` prompt samples: a shallow copy sharing CLIP and the
    Bayes-PFL module (nothing is loaded again)."""
    if sample_num == detector.sample_num:
        return detector
    other = copy.copy(detector)
    other.sample_num = sample_num
    other.reset_samples()
    return other


# --------------------------------------------------------------------------------------------
# One run of the page: read, score, draw, decide


@dataclass
class Limits:
    """What one request may hold."""
    max_images: int = 32
    max_file_bytes: int = 20 * UNITS_MB


@dataclass
class Scored:
    """A scored run, kept in the page's state so that a new threshold re-decides it."""
    folder: str                       # the run's files (overlays, CSV, JSON)
    rows: list[dict]                  # predict.py's rows, without decisions
    skipped: list[dict]               # {"path", "class_name", "error"}
    overlays: list[str]               # one file per row
    spreads: list[str]                # one file per row with uncertainty, else none
    references: list[str]             # the references compared with (few-shot), else none
    settings: dict
    record: dict                      # provenance
    notes: list[str] = field(default_factory=list)
    writes: int = 0                   # versions of the CSV / JSON written (a folder each)


def read_uploads(paths: Sequence[str], limits: Limits, exif_transpose: bool, what: str
                 ) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """(file name, 8-bit PIL image) of each readable upload, read by the one reader
    (``models.imaging.to_pil_image``), and (file name, one-line reason) of the others: over
    the size limit, or not a readable image."""
    images, refused = [], []
    for path in paths:
        name = os.path.basename(path)
        size = os.path.getsize(path) if os.path.isfile(path) else 0
        if size > limits.max_file_bytes:
            refused.append((name, f"{what} {name} is {size / UNITS_MB:.1f} MB, over the page's "
                                  f"limit of {limits.max_file_bytes / UNITS_MB:g} MB per file "
                                  f"(--max_file_mb)"))
            continue
        try:
            images.append((name, to_pil_image(path, exif_transpose)))
        except InputError as error:
            refused.append((name, str(error).replace(path, name)))
    return images, refused


def check_request(class_name: str, groups: Sequence[tuple[str, Sequence[str]]],
                  limits: Limits) -> str:
    """The class name stripped; one InputError for a request the page refuses (no class name,
    more files in a group than ``limits.max_images``)."""
    if not class_name.strip():
        raise InputError("no class name: type the object's name (e.g. 'metal nut', 'bottle')")
    for what, given in groups:
        if len(given) > limits.max_images:
            raise InputError(f"{len(given)} {what}: the page takes at most {limits.max_images} "
                             f"per run (--max_images)")
    return class_name.strip()


class Inspector:
    """The page's work, apart from Gradio: one detector (loaded once) and the settings."""

    def __init__(self, detector: AnomalyDetector, weights: Weights, settings: dict,
                 work_dir: str, limits: Limits, batch_size: int = 8,
                 exif_transpose: bool = True):
        self.detector = detector
        self.weights = weights
        self.settings = settings
        self.work_dir = work_dir
        self.limits = limits
        self.batch_size = batch_size
        self.exif_transpose = exif_transpose

    def _read_references(self, paths: Sequence[str], notes: list[str]):
        """(names, PIL images) of the readable references; the others noted, and one
        InputError when none can be read."""
        images, refused = read_uploads(paths, self.limits, self.exif_transpose,
                                       "reference image")
        notes.extend(f"reference skipped: {reason}" for _, reason in refused)
        if paths and not images:
            raise InputError("none of the reference images could be read: " + "; ".join(
                reason for _, reason in refused))
        return [n for n, _ in images], [im for _, im in images]

    def score(self, files: Sequence[str], class_name: str, references: Sequence[str],
              few_shot: bool, sample_num: int, seed: int, uncertainty: bool) -> Scored:
        """Read and score the uploads with ``predict_images`` (the unreadable ones listed with
        their reason; ``few_shot``: compared with the readable references), draw the overlays;
        returns the run without decisions."""
        started = time.time()
        seed = check_seed(seed, "the seed")
        if not files:
            raise InputError("no images: drop one or more image files on 'Images to inspect'")
        class_name = check_request(class_name, [("images", files), ("reference images",
                                                                    references)], self.limits)
        notes: list[str] = []
        ref_names, ref_images = self._read_references(references if few_shot else [], notes)
        detector = with_sample_num(self.detector, sample_num)
        bank = references_of(detector, ref_images) if ref_images else None
        images, refused = read_uploads(files, self.limits, self.exif_transpose, "image")
        run = Scored(os.path.join(self.work_dir, "runs", uuid.uuid4().hex[:12]), [],
                     [{"path": n, "class_name": class_name, "error": r} for n, r in refused],
                     [], [], ref_names, {}, {}, notes)
        results = predict_images(detector, [im for _, im in images], class_name,
                                 batch_size=self.batch_size, seed=seed, return_std=uncertainty,
                                 references=bank, return_fewshot=False) if images else []
        for k, ((name, image), res) in enumerate(zip(images, results)):
            file_name = f"{k:03d}_{os.path.splitext(name)[0]}.png"
            run.overlays.append(os.path.join(run.folder, "overlays", file_name))
            save_overlay(run.overlays[-1], image, res["anomaly_map"])
            if uncertainty:
                run.spreads.append(os.path.join(run.folder, "uncertainty", file_name))
                save_overlay(run.spreads[-1], image, res["anomaly_map_std"], vmax=STD_SCALE)
            # decided at the slider's threshold later; the overlays are the page's own
            run.rows.append(prediction_row(name, class_name, image, res, None,
                                           uncertainty=uncertainty))
        run.settings = {**self.settings, "class_name": class_name, "sample_num": sample_num,
                        "seed": seed, "uncertainty": uncertainty, "few_shot": bool(ref_names),
                        "stage": detector.stage}
        run.record = provenance(run.settings, self.weights.clip, self.weights.checkpoint,
                                device=detector.device, precision=detector.precision,
                                started=started)
        log.info("scored %d images of class '%s' (R = %d, seed %d, %s)%s", len(run.rows),
                 class_name, sample_num, seed,
                 f"few-shot, K = {len(ref_names)}" if ref_names else "zero-shot",
                 f", {len(run.skipped)} skipped" if run.skipped else "")
        return run

    def calibrate(self, references: Sequence[str], class_name: str, few_shot: bool,
                  sample_num: int, seed: int, percentile: float) -> dict:
        """predict.py's threshold record of --calibrate on the reference images: the
        ``percentile`` of their scores with the page's settings. ``few_shot``: each reference
        is scored against the others (leave one out: compared with itself, its few-shot map
        would be 0 and the threshold too low), so at least two are needed."""
        seed = check_seed(seed, "the seed")
        if not references:
            raise InputError("no reference images: drop good images on 'Good reference "
                             "images' to set the threshold from their scores")
        class_name = check_request(class_name, [("reference images", references)], self.limits)
        notes: list[str] = []
        names, images = self._read_references(references, notes)
        detector = with_sample_num(self.detector, sample_num)
        if not few_shot:
            scores = [r["score"] for r in predict_images(detector, images, class_name,
                                                         batch_size=self.batch_size, seed=seed)]
        elif len(images) < 2:
            raise InputError("setting the threshold in the few-shot mode needs at least 2 "
                             "readable reference images: each is scored against the others")
        else:                   # the references encoded once, each left out of the bank
            bank = references_of(detector, images)
            scores = [predict_images(detector, [image], class_name, seed=seed,
                                     references=bank.without(k))[0]["score"]
                      for k, image in enumerate(images)]
        return {"method": "calibrated", "value": calibrate_threshold(scores, percentile),
                "rule": DECISION_RULE,
                "calibration": {"directory": None, "images": names, "n_images": len(scores),
                                "percentile": percentile, "class_names": [class_name],
                                "leave_one_out": few_shot, "score_min": float(min(scores)),
                                "score_max": float(max(scores)), "skipped": notes}}


def threshold_record(threshold: float, calibration: dict | None) -> dict:
    """predict.py's threshold record: ``calibration`` (set from the references) while the
    slider holds its value (to the slider's step), else a fixed threshold."""
    if calibration is not None and abs(calibration["value"] - threshold) <= THRESHOLD_STEP / 2:
        return calibration
    return {"method": "fixed", "value": float(threshold), "rule": DECISION_RULE}


def decided(run: Scored, threshold: float, calibration: dict | None = None
            ) -> tuple[list[dict], tuple[str, str]]:
    """(the rows with their decisions at ``threshold``, the (CSV, JSON) paths of a new
    version of predict.py's files holding them)."""
    chosen = threshold_record(threshold, calibration)
    rows = [{**row, "decision": decide(row["score"], chosen["value"])} for row in run.rows]
    references = {"n_images": len(run.references), "paths": run.references,
                  "fewshot_weight": run.settings.get("fewshot_weight")} if run.references else None
    result = {**predictions_record("complete", chosen, rows, run.skipped, 0, references,
                                   run.settings),
              "provenance": run.record}
    run.writes += 1
    folder = os.path.join(run.folder, f"files{run.writes}")
    os.makedirs(folder, exist_ok=True)
    return rows, write_outputs(folder, result)


def table_rows(rows: Sequence[dict], skipped: Sequence[dict]) -> list[list[str]]:
    """The page's table: name, score, score_std, verdict (the skipped files last)."""
    def fmt(value):
        return "" if value is None else f"{value:.6f}"
    return ([[r["path"], fmt(r["score"]), fmt(r.get("score_std")), r["decision"]] for r in rows]
            + [[s["path"], "", "", "skipped"] for s in skipped])


def captions(rows: Sequence[dict]) -> list[str]:
    """One caption per overlay: name, score (± its spread), verdict."""
    out = []
    for r in rows:
        spread = f" ± {r['score_std']:.4f}" if r.get("score_std") is not None else ""
        out.append(f"{r['path']}: score {r['score']:.4f}{spread}, {r['decision']}")
    return out


def messages_html(run: Scored | None, lines: Sequence[str] = ()) -> str:
    """The page's message box: what was scored, one line per skipped file, then ``lines``."""
    said = []
    if run is not None:
        mode = (f"few-shot, K = {len(run.references)} reference images" if run.references
                else "zero-shot")
        said.append(f"{len(run.rows)} images scored ({mode})"
                    + (f", {len(run.skipped)} skipped" if run.skipped else ""))
        said += [s["error"] for s in run.skipped] + run.notes
    said += list(lines)
    return "".join(f'<p class="message">{html.escape(line)}</p>' for line in said)


def shots_text(references: Sequence[str] | None, few_shot: bool) -> str:
    """The mode the references give, K shown."""
    k = len(references or [])
    if not k:
        return "**zero-shot** (no reference images)"
    if few_shot:
        return f"**few-shot: K = {k}** reference images"
    return f"**zero-shot**: the {k} reference images only set the threshold"


def weights_text(weights: Weights, detector: AnomalyDetector) -> str:
    """What the page runs on, one line (the demo's random-weight files said as such)."""
    layers = " ".join(map(str, detector.layers))
    if weights.demo:
        return (f"Running on the demo's **random-weight** files ({weights.clip}, "
                f"{weights.checkpoint}; {detector.image_size} px, layers {layers}): they show "
                f"the page, not real accuracy. Real weights: pretrained_weight/README.md and "
                f"bayes_weight/README.md.")
    return (f"Weights: {weights.clip}, {weights.checkpoint} ({detector.image_size} px, layers "
            f"{layers}, stage {detector.stage}).")


# --------------------------------------------------------------------------------------------
# The page (Gradio is imported once the offline settings are in the environment)


def build_page(inspector: Inspector, sample_num: int, seed: int):
    """The Gradio Blocks of the page and its theme."""
    import gradio as gr

    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    with gr.Blocks(title="Bayes-PFL inspection", analytics_enabled=False) as page:
        gr.Markdown("## Bayes-PFL inspection page\n"
                    + weights_text(inspector.weights, inspector.detector), elem_id="weights")
        run_state = gr.State(None)              # the last Scored run
        calibration_state = gr.State(None)      # the last threshold set from the references
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images to inspect", file_count="multiple",
                                type="filepath", height=120, elem_id="images")
                class_name = gr.Dropdown(choices=class_suggestions(), value=None,
                                         allow_custom_value=True, label="Class name",
                                         info="the object's name, as put in the prompts",
                                         elem_id="class_name")
                references = gr.File(label="Good reference images (optional)",
                                     file_count="multiple", type="filepath", height=120,
                                     elem_id="references")
                with gr.Row(equal_height=True):
                    few_shot = gr.Checkbox(value=True, label="Few-shot: compare with them",
                                           elem_id="few_shot")
                    shots = gr.Markdown(shots_text(None, True), elem_id="shots")
                with gr.Row():
                    samples = gr.Number(value=sample_num, precision=0, minimum=1,
                                        label="Samples R", elem_id="samples")
                    seed_box = gr.Number(value=seed, precision=0, label="Seed",
                                         elem_id="seed")
                with gr.Row(equal_height=True):
                    uncertainty = gr.Checkbox(value=False, label="Uncertainty (spread maps)",
                                              elem_id="uncertainty")
                    score_button = gr.Button("Score", variant="primary", elem_id="score")
            with gr.Column(scale=2):
                messages = gr.HTML("", elem_id="messages")
                with gr.Row(equal_height=True):
                    threshold = gr.Slider(0.0, 1.0, value=0.5, step=THRESHOLD_STEP,
                                          label="Threshold", info=DECISION_RULE,
                                          elem_id="threshold", scale=3)
                    percentile = gr.Number(value=100.0, minimum=0, maximum=100,
                                           label="Percentile", elem_id="percentile", scale=1)
                    calibrate_button = gr.Button("Set from the references' scores",
                                                 elem_id="calibrate", scale=1)
                overlays = gr.Gallery(label="Heat maps (probability, 0 blue .. 1 red)",
                                      columns=4, height=240, object_fit="contain",
                                      format="png", elem_id="overlays", interactive=False)
                spreads = gr.Gallery(label=f"Spread over the samples (0 .. {STD_SCALE})",
                                     columns=4, height=240, object_fit="contain",
                                     format="png", elem_id="spreads", visible=False,
                                     interactive=False)
                table = gr.Dataframe(headers=TABLE_HEADERS, value=None, interactive=False,
                                     elem_id="table", label="All images")
                downloads = gr.File(label="predictions.csv, predictions.json",
                                    file_count="multiple", interactive=False,
                                    elem_id="downloads")

        def show(run: Scored, value: float, calibration: dict | None):
            rows, files_written = decided(run, value, calibration)
            names = captions(rows)
            return (list(zip(run.overlays, names)),
                    gr.update(value=list(zip(run.spreads, names)), visible=bool(run.spreads)),
                    table_rows(rows, run.skipped), list(files_written))

        def slider_range(scores: Sequence[float]):
            return gr.update(maximum=max(1.0, math.ceil(max(scores, default=0.0) * 10) / 10))

        def on_score(paths, name, refs, compare, r, s, spread, value, calibration):
            try:
                run = inspector.score(paths or [], name or "", refs or [], bool(compare),
                                      int(r), s, bool(spread))
            except UserError as error:
                return (None, messages_html(None, [str(error)]), [], gr.update(visible=False),
                        None, None, gr.update())
            return (run, messages_html(run), *show(run, value, calibration),
                    slider_range([row["score"] for row in run.rows] + [value]))

        def on_threshold(run, value, calibration):
            if run is None:
                return gr.update(), gr.update(), gr.update(), gr.update()
            return show(run, value, calibration)

        def on_calibrate(run, refs, name, compare, r, s, pct):
            try:
                chosen = inspector.calibrate(refs or [], name or "", bool(compare), int(r),
                                             s, float(pct))
            except (UserError, ValueError) as error:
                return gr.update(), messages_html(run, [str(error)]), gr.update()
            said = (f"threshold {chosen['value']:.6f}: percentile {pct:g} of the scores of "
                    f"{chosen['calibration']['n_images']} reference images"
                    + (" (each against the others)" if compare else ""))
            return (chosen, messages_html(run, [said]),
                    gr.update(value=chosen["value"], **slider_range([chosen["value"]])))

        for trigger in (references.change, few_shot.change):
            trigger(shots_text, [references, few_shot], shots)
        # one model run at a time (score, calibrate); a moved threshold decides at its last
        # value, the values passed over while it moved are dropped
        score_button.click(on_score, [files, class_name, references, few_shot, samples,
                                      seed_box, uncertainty, threshold, calibration_state],
                           [run_state, messages, overlays, spreads, table, downloads, threshold],
                           concurrency_id="model")
        threshold.change(on_threshold, [run_state, threshold, calibration_state],
                         [overlays, spreads, table, downloads], trigger_mode="always_last")
        calibrate_button.click(on_calibrate, [run_state, references, class_name, few_shot,
                                              samples, seed_box, percentile],
                               [calibration_state, messages, threshold], concurrency_id="model")
    page.queue(default_concurrency_limit=1)
    return page, theme


# --------------------------------------------------------------------------------------------
# Command line


def get_parser() -> argparse.ArgumentParser:
    p = Parser(description="The inspection page: score images in the browser, see the heat "
                           "maps, set the threshold (a local Gradio app)",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_path", default=None,
                   help=f"CLIP weights. Neither weight flag: the demo's {DEMO_CLIP} (random "
                        f"weights, written by demo.py); --checkpoint_path alone: "
                        f"{DEFAULT_CLIP}")
    p.add_argument("--checkpoint_path", default=None,
                   help=f"Bayes-PFL checkpoint. Neither weight flag: the demo's "
                        f"{DEMO_CHECKPOINT}; --pretrained_path alone: {DEFAULT_CHECKPOINT}")
    add_model_arguments(p, from_checkpoint=True)
    p.add_argument("--sample_num", type=positive_int, default=10,
                   help="the page's default number of samples R")
    p.add_argument("--seed", type=seed_int, default=111, help="the page's default seed")
    p.add_argument("--batch_size", type=positive_int, default=8, help="images per forward")
    p.add_argument("--fewshot_weight", type=non_negative_float, default=1.0,
                   help="weight of the few-shot map in the anomaly map (with references)")
    add_runtime_arguments(p)
    p.add_argument("--ignore_exif", action="store_true",
                   help="read files without turning them upright by their EXIF orientation")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 opens the page to the network")
    p.add_argument("--port", type=port_int, default=7860)
    p.add_argument("--share", action="store_true",
                   help="also a public gradio.live link (the page then goes through Gradio's "
                        "servers)")
    p.add_argument("--max_file_mb", type=float, default=20.0,
                   help="largest upload accepted, per file (MB)")
    p.add_argument("--max_images", type=positive_int, default=32,
                   help="most images (and most reference images) per run")
    return p


def serve(args, inspector: Inspector, work_dir: str) -> None:
    """Launch the page and block until Ctrl-C or SIGTERM."""
    page, theme = build_page(inspector, args.sample_num, args.seed)
    log.info("uploads and results in %s (removed when the page stops)", work_dir)
    try:
        page.launch(server_name=args.host, server_port=args.port, share=args.share,
                    prevent_thread_lock=True, max_file_size=int(args.max_file_mb * UNITS_MB),
                    theme=theme, footer_links=["api", "settings"], run_history=False,
                    enable_monitoring=False, ssr_mode=False, pwa=False, mcp_server=False,
                    show_error=False, quiet=True, allowed_paths=[], inbrowser=False)
    except OSError:
        raise SettingsError(f"cannot serve the page on {args.host}:{args.port} (the port is "
                            f"taken or the address is not this machine's): pass another "
                            f"--port or --host") from None
    try:
        log.info("the page is at http://%s:%d/ (Ctrl-C to stop)",
                 "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host,
                 page.server_port)
        if args.share:
            log.warning("public link: %s (anyone with it can use the page)", page.share_url)
        while True:
            # short naps: Python runs a signal's handler (Ctrl-C, SIGTERM) in the main thread
            # only, and when the OS delivers the signal to another thread (the server's), a
            # main thread asleep for an hour would not notice it until it wakes
            time.sleep(0.25)
    except KeyboardInterrupt:
        log.info("stopping the page")
    finally:
        page.close(verbose=False)


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not (args.max_file_mb > 0 and math.isfinite(args.max_file_mb)):
        parser.error(f"--max_file_mb must be a positive number, not {args.max_file_mb:g}")
    setup_logging()
    try:
        weights = choose_weights(args.pretrained_path, args.checkpoint_path)
    except UserError as error:
        return fail(str(error), 1)
    os.environ.update(OFFLINE_ENV)
    interrupt_on_sigterm()                  # SIGTERM stops the page as Ctrl-C does
    work_dir = tempfile.mkdtemp(prefix="bayes-pfl-page-")
    os.environ["GRADIO_TEMP_DIR"] = work_dir              # uploads go here, removed at exit
    try:
        try:
            import gradio  # noqa: F401  (the extra; imported here, after OFFLINE_ENV)
        except ImportError:
            raise SettingsError("the page needs Gradio: pip install -e \".[app]\"") from None
        args.pretrained_path, args.checkpoint_path = weights.clip, weights.checkpoint
        detector = load_detector(args)                  # predict.py's: checked, loaded once
        detector.fewshot_weight = args.fewshot_weight
        if weights.demo:
            log.warning("running on the demo's random-weight files %s and %s: they show the "
                        "page, not real accuracy (real weights: pretrained_weight/README.md, "
                        "bayes_weight/README.md)", weights.clip, weights.checkpoint)
        settings = {k: v for k, v in vars(args).items() if k not in ("host", "port", "share")}
        settings.update(demo_weights=weights.demo, model_spec=detector.spec.to_dict())
        limits = Limits(args.max_images, int(args.max_file_mb * UNITS_MB))
        inspector = Inspector(detector, weights, settings, work_dir, limits, args.batch_size,
                              exif_transpose=not args.ignore_exif)
        serve(args, inspector, work_dir)
    except UserError as error:
        return fail(str(error), 1)
    except KeyboardInterrupt:
        log.info("stopped")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
