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
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

from models import AnomalyDetector
from models.errors import InputError, SettingsError, UserError, WeightsError
from dataset.registry import REGISTRY
from utils.cli import (Parser, add_model_arguments, add_runtime_arguments, fail, model_request,
                       positive_int)
from models.imaging import to_pil_image
from utils.inference import (SCORE_DEFINITION, STD_SCALE, calibrate_threshold, decide,
                             predict_images, save_overlay, write_outputs)
from utils.misc import resolve_device, setup_logging
from utils.provenance import provenance

log = logging.getLogger("bayes_pfl")

# Without weight flags: the files `python demo.py` writes (random weights).
DEMO_CLIP = os.path.join("demo_output", "clip_random.pt")
DEMO_CHECKPOINT = os.path.join("demo_output", "train", "best.pth")
DEFAULT_CLIP = "./pretrained_weight/ViT-L-14-336px.pt"          # predict.py's defaults
DEFAULT_CHECKPOINT = "./bayes_weight/train_visa.pth"
# Set before Gradio (and huggingface_hub) are imported: no analytics, no version check, no
# Hugging Face telemetry or hub calls, client-side rendering only (no Node server).
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_SSR_MODE": "False",
               "GRADIO_SHARE": "False", "DO_NOT_TRACK": "1"}
# System fonts only: Gradio's themes may fetch theirs from fonts.googleapis.com.
FONTS = ["system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"]
MONO_FONTS = ["ui-monospace", "Menlo", "Consolas", "monospace"]
TABLE_HEADERS = ["name", "score", "score_std", "verdict"]
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
    class_name: str
    rows: list[dict]                  # predict.py's rows, without decisions
    skipped: list[dict]               # {"path", "class_name", "error"}
    overlays: list[str]               # one file per row
    spreads: list[str]                # one file per row (with uncertainty), else empty
    references: list[str]             # names of the references used (few-shot), else empty
    settings: dict
    record: dict                      # provenance
    calibration: dict | None = None   # the last "set from the references" record
    writes: int = 0                   # CSV/JSON versions written (one folder each)
    uncertainty: bool = False
    notes: list[str] = field(default_factory=list)


def _name(path: str) -> str:
    return os.path.basename(path)


def read_uploads(paths: Sequence[str], limits: Limits, exif_transpose: bool, what: str
                 ) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """(name, 8-bit PIL image) of each readable upload through the one reader
    (``models.imaging.to_pil_image``), and (name, one-line reason) of the others: over the
    size limit, or not a readable image."""
    images, refused = [], []
    for path in paths:
        name = _name(path)
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


def check_request(files: Sequence[str], class_name: str, references: Sequence[str],
                  limits: Limits) -> str:
    """The class name stripped; an InputError (one line) for a request the page refuses."""
    if not files:
        raise InputError("no images: drop one or more image files on 'Images to inspect'")
    if not class_name.strip():
        raise InputError("no class name: type the object's name (e.g. 'metal nut', 'bottle')")
    for what, given in (("images", files), ("reference images", references)):
        if len(given) > limits.max_images:
            raise InputError(f"{len(given)} {what}: the page takes at most {limits.max_images} "
                             f"per run (--max_images)")
    return class_name.strip()


class Inspector:
    """The page's work, independent of Gradio: one detector (loaded once) and the settings."""

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

    def _references(self, detector, paths: Sequence[str], notes: list[str]):
        """(names, PIL images) of the readable references; the unreadable ones noted."""
        images, refused = read_uploads(paths, self.limits, self.exif_transpose,
                                       "reference image")
        notes.extend(f"reference skipped: {reason}" for _, reason in refused)
        return [n for n, _ in images], [im for _, im in images]

    def score(self, files: Sequence[str], class_name: str, references: Sequence[str],
              sample_num: int, seed: int, uncertainty: bool) -> Scored:
        """Read and score the uploads (unreadable ones listed with their reason), draw their
        overlays; returns the run without decisions."""
        started = time.time()
        class_name = check_request(files, class_name, references, self.limits)
        detector = with_sample_num(self.detector, sample_num)
        notes: list[str] = []
        ref_names, ref_images = self._references(detector, references, notes)
        if references and not ref_images:
            raise InputError("none of the reference images could be read: "
                             + "; ".join(notes))
        images, refused = read_uploads(files, self.limits, self.exif_transpose, "image")
        skipped = [{"path": n, "class_name": class_name, "error": r} for n, r in refused]
        folder = os.path.join(self.work_dir, "runs", uuid.uuid4().hex[:12])
        run = Scored(folder, class_name, [], skipped, [], [], ref_names, {}, {},
                     uncertainty=uncertainty, notes=notes)
        if images:
            results = predict_images(detector, [im for _, im in images], class_name,
                                     batch_size=self.batch_size, seed=seed,
                                     return_std=uncertainty)
            for k, ((name, image), res) in enumerate(zip(images, results)):
                stem = f"{k:03d}_{os.path.splitext(name)[0]}.png"
                run.overlays.append(os.path.join(folder, "overlays", stem))
                save_overlay(run.overlays[-1], image, res["anomaly_map"])
                row = {"path": name, "class_name": class_name, "score": res["score"],
                       "text_score": res["text_score"], "map_score": res["map_score"],
                       "overlay": None, "width": image.width, "height": image.height}
                if uncertainty:
                    run.spreads.append(os.path.join(folder, "uncertainty", stem))
                    save_overlay(run.spreads[-1], image, res["anomaly_map_std"], vmax=STD_SCALE)
                    row.update(score_std=res["score_std"], uncertainty_overlay=None)
                run.rows.append(row)
        run.settings = {**self.settings, "class_name": class_name, "sample_num": sample_num,
                        "seed": seed, "uncertainty": uncertainty, "references": ref_names,
                        "stage": self.detector.stage}
        run.record = provenance(run.settings, self.weights.clip, self.weights.checkpoint,
                                device=self.detector.device,
                                precision=self.settings.get("precision"), started=started)
        log.info("scored %d images of class '%s' (R = %d, seed %d, %s)%s", len(run.rows),
                 class_name, sample_num, seed,
                 f"{len(ref_names)} references" if ref_names else "zero-shot",
                 f", {len(skipped)} skipped" if skipped else "")
        return run

    def calibrate(self, references: Sequence[str], class_name: str, sample_num: int,
                  seed: int, percentile: float) -> dict:
        """The threshold record of predict.py --calibrate on the reference images: the
        ``percentile`` of their scores with the same settings."""
        class_name = check_request(references or [""], class_name, references, self.limits)
        if not references:
            raise InputError("no reference images: drop good images on 'Good reference "
                             "images' to set the threshold from their scores")
        detector = with_sample_num(self.detector, sample_num)
        notes: list[str] = []
        names, images = self._references(detector, references, notes)
        if not images:
            raise InputError("none of the reference images could be read: " + "; ".join(notes))
        scores = [r["score"] for r in predict_images(detector, images, class_name,
                                                     batch_size=self.batch_size, seed=seed)]
        value = calibrate_threshold(scores, percentile)
        return {"method": "calibrated", "value": value,
                "calibration": {"directory": "the page's reference images",
                                "images": names, "n_images": len(scores),
                                "percentile": percentile, "class_names": [class_name],
                                "score_min": float(min(scores)),
                                "score_max": float(max(scores)),
                                "skipped": notes}}


def threshold_record(run: Scored, threshold: float) -> dict:
    """predict.py's threshold record: the calibrated one while the slider holds its value,
    else a fixed threshold."""
    if run.calibration is not None and math.isclose(run.calibration["value"], threshold,
                                                    rel_tol=0, abs_tol=1e-9):
        return run.calibration
    return {"method": "fixed", "value": float(threshold)}


def decided(run: Scored, threshold: float) -> tuple[list[dict], dict, tuple[str, str]]:
    """(rows with their decisions, what predict.py's predictions.json would hold, (CSV, JSON)
    paths of a new version of the files) at ``threshold``."""
    chosen = threshold_record(run, threshold)
    rows = [{**row, "decision": decide(row["score"], chosen["value"])} for row in run.rows]
    result = {"threshold": chosen,
              "summary": {"n_images": len(rows),
                          "n_anomalous": sum(r["decision"] == "anomalous" for r in rows),
                          "n_skipped": len(run.skipped)},
              "score": SCORE_DEFINITION, "settings": run.settings, "predictions": rows,
              "skipped": run.skipped, "provenance": run.record}
    run.writes += 1
    folder = os.path.join(run.folder, f"files{run.writes}")
    os.makedirs(folder, exist_ok=True)
    return rows, result, write_outputs(folder, result)


def table_rows(rows: Sequence[dict], skipped: Sequence[dict]) -> list[list[str]]:
    """The page's table: name, score, score_std, verdict (skipped files last)."""
    def fmt(value):
        return "" if value is None else f"{value:.6f}"
    return ([[r["path"], fmt(r["score"]), fmt(r.get("score_std")), r["decision"]] for r in rows]
            + [[s["path"], "", "", "skipped"] for s in skipped])


def captions(rows: Sequence[dict]) -> list[str]:
    """One caption per overlay: name, score (and its spread), verdict."""
    out = []
    for r in rows:
        spread = f" ± {r['score_std']:.4f}" if r.get("score_std") is not None else ""
        out.append(f"{r['path']}: score {r['score']:.4f}{spread}, {r['decision']}")
    return out


def messages_html(run: Scored | None, errors: Sequence[str] = ()) -> str:
    """The page's message box: one line per skipped file or refused request."""
    lines = list(errors)
    if run is not None:
        lines += [s["error"] for s in run.skipped] + run.notes
        mode = (f"few-shot, K = {len(run.references)} reference images" if run.references
                else "zero-shot (no reference images)")
        lines.insert(0, f"{len(run.rows)} images scored ({mode})"
                        + (f", {len(run.skipped)} skipped" if run.skipped else ""))
    return "".join(f'<p class="message">{html.escape(line)}</p>' for line in lines)


def shots_text(references: Sequence[str] | None) -> str:
    """The mode the references give: K shown."""
    k = len(references or [])
    return f"**few-shot: K = {k}**" if k else "**zero-shot** (no reference images)"


def weights_text(weights: Weights, detector: AnomalyDetector) -> str:
    """What the page runs on, one line (random-weight demo files said as such)."""
    spec = detector.spec.to_dict() if detector.spec is not None else {}
    size = spec.get("image_size", detector.image_size)
    layers = " ".join(map(str, detector.layers))
    if weights.demo:
        return (f"Running on the demo's **random-weight** files ({weights.clip}, "
                f"{weights.checkpoint}; {size} px, layers {layers}): they show the page, not "
                f"real accuracy. For real weights see pretrained_weight/README.md and "
                f"bayes_weight/README.md.")
    return (f"Weights: {weights.clip}, {weights.checkpoint} ({size} px, layers {layers}, "
            f"stage {detector.stage}).")


# --------------------------------------------------------------------------------------------
# The page (Gradio is imported once the offline settings are in the environment)


def build_page(inspector: Inspector, sample_num: int, seed: int):
    """The Gradio Blocks of the page and its theme."""
    import gradio as gr

    theme = gr.themes.Default(font=FONTS, font_mono=MONO_FONTS)
    with gr.Blocks(title="Bayes-PFL inspection", analytics_enabled=False) as page:
        gr.Markdown("## Bayes-PFL inspection page\n"
                    + weights_text(inspector.weights, inspector.detector), elem_id="weights")
        run_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(label="Images to inspect", file_count="multiple",
                                type="filepath", height=150, elem_id="images")
                class_name = gr.Dropdown(choices=class_suggestions(), value=None,
                                         allow_custom_value=True, label="Class name",
                                         info="the object's name as put in the prompts",
                                         elem_id="class_name")
                references = gr.File(label="Good reference images (optional: few-shot)",
                                     file_count="multiple", type="filepath", height=150,
                                     elem_id="references")
                shots = gr.Markdown(shots_text(None), elem_id="shots")
                with gr.Row():
                    samples = gr.Number(value=sample_num, precision=0, minimum=1,
                                        label="Samples R", elem_id="samples")
                    seed_box = gr.Number(value=seed, precision=0, label="Seed",
                                         elem_id="seed")
                uncertainty = gr.Checkbox(value=False, label="Uncertainty (spread maps)",
                                          elem_id="uncertainty")
                score_button = gr.Button("Score", variant="primary", elem_id="score")
            with gr.Column(scale=2):
                messages = gr.HTML("", elem_id="messages")
                with gr.Row():
                    threshold = gr.Slider(0.0, 1.0, value=0.5, step=1e-6, label="Threshold",
                                          info="verdict 'anomalous' when score >= threshold",
                                          elem_id="threshold", scale=3)
                    percentile = gr.Number(value=100.0, minimum=0, maximum=100,
                                           label="Percentile", elem_id="percentile", scale=1)
                    calibrate_button = gr.Button("Set from the references' scores",
                                                 elem_id="calibrate", scale=1)
                overlays = gr.Gallery(label="Heat maps (probability 0..1)", columns=4,
                                      height=320, object_fit="contain", format="png",
                                      elem_id="overlays", interactive=False)
                spreads = gr.Gallery(label=f"Spread over the samples (0..{STD_SCALE})",
                                     columns=4, height=320, object_fit="contain", format="png",
                                     elem_id="spreads", visible=False, interactive=False)
                table = gr.Dataframe(headers=TABLE_HEADERS, value=None, interactive=False,
                                     elem_id="table", label="All images")
                downloads = gr.File(label="predictions.csv / predictions.json",
                                    file_count="multiple", interactive=False,
                                    elem_id="downloads")

        def show(run: Scored, value: float):
            rows, _, (csv_path, json_path) = decided(run, value)
            names = captions(rows)
            return (list(zip(run.overlays, names)),
                    gr.update(value=list(zip(run.spreads, names)), visible=run.uncertainty),
                    table_rows(rows, run.skipped), [csv_path, json_path])

        def on_score(paths, name, refs, r, s, spread, value):
            try:
                run = inspector.score(paths or [], name or "", refs or [], int(r), int(s),
                                      bool(spread))
            except UserError as error:
                return (None, messages_html(None, [str(error)]), [], gr.update(visible=False),
                        None, None, gr.update())
            top = max([1.0] + [row["score"] for row in run.rows])
            return (run, messages_html(run), *show(run, value),
                    gr.update(maximum=math.ceil(top * 10) / 10))

        def on_threshold(run, value):
            if run is None:
                return gr.update(), gr.update(), gr.update(), gr.update()
            return show(run, value)

        def on_calibrate(run, refs, name, r, s, pct):
            try:
                chosen = inspector.calibrate(refs or [], name or "", int(r), int(s), float(pct))
            except (UserError, ValueError) as error:
                return run, messages_html(run, [str(error)]), gr.update()
            if run is not None:
                run.calibration = chosen
            line = (f"threshold {chosen['value']:.6f}: percentile {pct:g} of the scores of "
                    f"{chosen['calibration']['n_images']} reference images")
            top = max(1.0, chosen["value"])
            return (run, messages_html(run, [line]),
                    gr.update(value=chosen["value"], maximum=math.ceil(top * 10) / 10))

        references.change(lambda refs: shots_text(refs), references, shots)
        score_button.click(on_score, [files, class_name, references, samples, seed_box,
                                      uncertainty, threshold],
                           [run_state, messages, overlays, spreads, table, downloads, threshold])
        threshold.change(on_threshold, [run_state, threshold],
                         [overlays, spreads, table, downloads])
        calibrate_button.click(on_calibrate, [run_state, references, class_name, samples,
                                              seed_box, percentile],
                               [run_state, messages, threshold])
    page.queue(default_concurrency_limit=1)
    return page, theme


# --------------------------------------------------------------------------------------------
# Command line


def get_parser() -> argparse.ArgumentParser:
    p = Parser(description="The inspection page: score images in the browser, see the heat "
                           "maps, set the threshold (a local Gradio app)",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained_path", default=None,
                   help=f"CLIP weights; without both weight flags: {DEMO_CLIP} when it exists "
                        f"(random weights, written by demo.py), else {DEFAULT_CLIP}")
    p.add_argument("--checkpoint_path", default=None,
                   help=f"Bayes-PFL checkpoint; without both weight flags: {DEMO_CHECKPOINT} "
                        f"when it exists, else {DEFAULT_CHECKPOINT}")
    add_model_arguments(p, from_checkpoint=True)
    p.add_argument("--sample_num", type=positive_int, default=10,
                   help="the page's default number of samples R")
    p.add_argument("--seed", type=int, default=111, help="the page's default seed")
    p.add_argument("--batch_size", type=positive_int, default=8, help="images per forward")
    add_runtime_arguments(p)
    p.add_argument("--ignore_exif", action="store_true",
                   help="read files without turning them upright by their EXIF orientation")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 opens the page to the network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true",
                   help="also a public gradio.live link (the page then goes through Gradio's "
                        "servers)")
    p.add_argument("--max_file_mb", type=float, default=20.0,
                   help="largest upload accepted, per file (MB)")
    p.add_argument("--max_images", type=positive_int, default=32,
                   help="most images (and most reference images) per run")
    return p


def load_detector(args, weights: Weights) -> AnomalyDetector:
    """The detector (weights checked and loaded once)."""
    return AnomalyDetector.from_files(
        weights.clip, weights.checkpoint,
        device=resolve_device(args.device, args.device_id), sample_num=args.sample_num,
        precision=args.precision, verify=not args.no_verify, **model_request(args))


def _stop(signum, frame):
    """SIGTERM stops the page as Ctrl-C does (the temporary folder is removed)."""
    raise KeyboardInterrupt


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
            time.sleep(3600)
    except KeyboardInterrupt:
        log.info("stopping the page")
    finally:
        page.close()


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logging()
    if not (args.max_file_mb > 0 and math.isfinite(args.max_file_mb)):
        return fail(f"--max_file_mb must be a positive number, not {args.max_file_mb:g}", 2)
    os.environ.update(OFFLINE_ENV)
    signal.signal(signal.SIGTERM, _stop)
    work_dir = tempfile.mkdtemp(prefix="bayes-pfl-page-")
    os.environ["GRADIO_TEMP_DIR"] = work_dir              # uploads go here, removed at exit
    try:
        try:
            import gradio  # noqa: F401  (the extra; imported here, after OFFLINE_ENV)
        except ImportError:
            raise SettingsError("the page needs Gradio: pip install -e \".[app]\"") from None
        weights = choose_weights(args.pretrained_path, args.checkpoint_path)
        detector = load_detector(args, weights)
        if weights.demo:
            log.warning("running on the demo's random-weight files %s and %s: they show the "
                        "page, not real accuracy (real weights: pretrained_weight/README.md, "
                        "bayes_weight/README.md)", weights.clip, weights.checkpoint)
        settings = {k: v for k, v in vars(args).items() if k not in ("host", "port", "share")}
        settings.update(pretrained_path=weights.clip, checkpoint_path=weights.checkpoint,
                        demo_weights=weights.demo, model_spec=detector.spec.to_dict())
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
