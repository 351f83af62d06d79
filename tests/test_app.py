"""The inspection page (app.py) in a real browser: headless Chromium driven by Selenium against
`python app.py` in a subprocess, on tiny random weights.

The page's scores, verdicts, overlays and CSV are compared with ``predict_images`` computed
here on the same files and seed; the subprocess runs with a ``sitecustomize`` that refuses and
records every connection to an address that is not loopback, and the browser's resource list
is read back, so that an outbound call of the page or of Gradio fails the tests."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image
from selenium import webdriver                                     # the test extra
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

import app as page_app
from models import AnomalyDetector
from models.errors import InputError
from models.imaging import to_pil_image
from tests.clip_factory import TINY_LAYERS
from utils.inference import (CSV_COLUMNS, DECISION_RULE, calibrate_threshold, decide,
                             predict_images)
from utils.visualize import heat_overlay

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# .ci/run sets it: there a missing browser fails the tests instead of skipping them.
BROWSER_REQUIRED = os.environ.get("BAYES_PFL_BROWSER_TESTS") == "required"
CLASS_NAME = "bottle"
TINY_FLAGS = ["--image_size", "32", "--features_list", *map(str, TINY_LAYERS)]
WAIT_S = 60          # the browser's waits for the page
# The app's start and stop: events waited on (a log line, the process's exit), never timed. The
# deadline only ends a test that would otherwise hang, long enough for a loaded CI machine; at
# it, the process's threads' stacks go into the failure (faulthandler on SIGABRT).
PROCESS_DEADLINE_S = 300
LOOPBACK = ("127.0.0.1", "::1", "localhost")

# Written next to the app as sitecustomize.py: refuses and records (one JSON line each) every
# DNS lookup or connection to an address that is not loopback, and records every bind.
GUARD = r'''
import json, os, socket

_LOG = os.environ["PAGE_TEST_NET_LOG"]
_LOOPBACK = ("127.", "::1", "localhost", "0.0.0.0", "::")


def _record(kind, address):
    with open(_LOG, "a") as f:
        f.write(json.dumps({"kind": kind, "address": repr(address)}) + "\n")


def _local(host):
    return host is None or (isinstance(host, (str, bytes)) and
                            (host.decode() if isinstance(host, bytes) else host)
                            .startswith(_LOOPBACK))


def _guard(address, kind):
    if isinstance(address, tuple) and not _local(address[0]):
        _record(kind, address)
        raise OSError(101, "network access refused by the test")


_connect, _connect_ex, _bind = socket.socket.connect, socket.socket.connect_ex, socket.socket.bind
_create_connection, _getaddrinfo = socket.create_connection, socket.getaddrinfo


def connect(self, address):
    _guard(address, "connect")
    return _connect(self, address)


def connect_ex(self, address):
    _guard(address, "connect")
    return _connect_ex(self, address)


def bind(self, address):
    if isinstance(address, tuple):
        _record("bind", address)
    return _bind(self, address)


def create_connection(address, *args, **kwargs):
    _guard(address, "create_connection")
    return _create_connection(address, *args, **kwargs)


def getaddrinfo(host, *args, **kwargs):
    _guard((host,), "getaddrinfo")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.socket.bind = connect, connect_ex, bind
socket.create_connection, socket.getaddrinfo = create_connection, getaddrinfo
'''


# --------------------------------------------------------------------------------------------
# The app in a subprocess, the browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """`python app.py` on a free loopback port, its log and the network guard's records."""

    def __init__(self, folder, tiny_files, extra=(), cwd=None):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
            f.write(GUARD)
        self.net_log = os.path.join(folder, "net.jsonl")
        self.log_path = os.path.join(folder, "app.log")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, ROOT]),
               "PAGE_TEST_NET_LOG": self.net_log, "PYTHONFAULTHANDLER": "1",
               "OMP_NUM_THREADS": str(torch.get_num_threads())}
        clip, ckpt = tiny_files
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "app.py"), "--pretrained_path", clip,
             "--checkpoint_path", ckpt, *TINY_FLAGS, "--port", str(self.port), *extra],
            cwd=cwd or folder, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        self.wait_ready()

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self):
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"app.py exited with {self.proc.returncode}:\n{self.log()}")
            if "the page is at" in self.log():
                return
            time.sleep(0.1)
        self._fail_with_stacks("did not say where the page is")

    def _fail_with_stacks(self, what: str):
        """End the hung process with SIGABRT (faulthandler writes every thread's stack into
        its log), then fail with what was still running."""
        self.proc.send_signal(signal.SIGABRT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()
        raise AssertionError(f"app.py {what} within {PROCESS_DEADLINE_S} s; its log and the "
                             f"stacks of its threads:\n{self.log()}")

    def wait_exit(self) -> int:
        """The exit status, once the process has exited (on its own or after a signal)."""
        try:
            return self.proc.wait(PROCESS_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self._fail_with_stacks("did not exit")

    def records(self) -> list[dict]:
        if not os.path.isfile(self.net_log):
            return []
        with open(self.net_log) as f:
            return [json.loads(line) for line in f if line.strip()]

    def work_dir(self) -> str:
        line = next(x for x in self.log().splitlines() if "uploads and results in" in x)
        return line.split("uploads and results in ")[1].split(" (removed")[0]

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.wait_exit()
        self.log_file.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def app(tiny_files, tmp_path_factory):
    """One app subprocess for the module's browser tests (started without --host)."""
    server = App(str(tmp_path_factory.mktemp("app")), tiny_files)
    yield server
    server.stop()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium (Debian's chromium and chromium-driver), a new profile in tmp_path."""
    if not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)):
        why = ("the browser tests need Chromium and chromedriver: apt-get install chromium "
               "chromium-driver (.ci/run does it)")
        pytest.fail(why) if BROWSER_REQUIRED else pytest.skip(why)
    opts = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    opts.binary_location = CHROMIUM
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(service=service, options=opts)
    yield driver
    driver.quit()


# --------------------------------------------------------------------------------------------
# Test files and the page's read-back


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two images of different sizes, a corrupt .png, two good references."""
    folder = tmp_path_factory.mktemp("uploads")
    rng = np.random.default_rng(5)
    paths = {}
    for name, (w, h) in (("part_a.png", (40, 30)), ("part_b.png", (52, 64)),
                         ("good_1.png", (36, 36)), ("good_2.png", (44, 40))):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arr[h // 3:h // 2, w // 3:w // 2] = 255 if name.startswith("part") else arr[0, 0]
        Image.fromarray(arr).save(folder / name)
        paths[name] = str(folder / name)
    (folder / "broken.png").write_bytes(b"this is not a PNG file")
    paths["broken.png"] = str(folder / "broken.png")
    return paths


@pytest.fixture(scope="module")
def detector(tiny_files):
    """The detector the app builds from the same files and flags (R = 10)."""
    clip, ckpt = tiny_files
    return AnomalyDetector.from_files(clip, ckpt, image_size=32, layers=TINY_LAYERS,
                                      device="cpu", sample_num=10)


def wait(driver, condition, timeout=WAIT_S):
    """The first truthy value of ``condition(driver)``; on a timeout, an AssertionError that
    shows the page's messages and table."""
    try:
        return WebDriverWait(driver, timeout, ignored_exceptions=(
            StaleElementReferenceException,)).until(lambda d: condition(d))
    except TimeoutException:
        messages = driver.find_elements(By.ID, "messages")
        raise AssertionError(f"the page did not get there in {timeout} s; messages: "
                             f"{messages[0].text if messages else None!r}; table: "
                             f"{table(driver)}") from None


def open_page(driver, url):
    driver.get(url)
    return wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#images input[type=file]"))


def upload(driver, elem_id, paths):
    """Drop files on an upload box (its file input); returns once it lists them."""
    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]")
    box.send_keys("\n".join(paths))
    names = [os.path.basename(p) for p in paths]
    wait(driver, lambda d: all(n.rsplit(".", 1)[0] in d.find_element(By.ID, elem_id).text
                               for n in names))


def type_class(driver, name):
    """Type the class name into its box (free text; the suggestions stay closed)."""
    box = driver.find_element(By.CSS_SELECTOR, "#class_name input")
    box.clear()
    box.send_keys(name)
    box.send_keys(Keys.TAB)


def table(driver) -> list[list[str]]:
    """The rows of the page's table (name, score, score_std, verdict), read in one script
    (the page may re-render between two element reads)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#table [role=row][data-index]')].map(r =>"
        " [...r.querySelectorAll('[role=gridcell]')].map(c => c.textContent.trim()));")


def score(driver, n_rows):
    """Click Score; returns the table once it shows the new run's ``n_rows`` rows (those of its
    predictions.json)."""
    before = downloads(driver).get("predictions.json")
    driver.find_element(By.ID, "score").click()

    def shown(d):
        url = downloads(d).get("predictions.json")
        if url in (None, before):
            return None
        record = json.loads(fetch(url))
        rows = table(d)
        scores = [f"{r['score']:.6f}" for r in record["predictions"]]
        return rows if len(rows) == n_rows and [r[1] for r in rows[:len(scores)]] == scores \
            else None
    return wait(driver, shown)


def gallery(driver, elem_id="overlays") -> list[tuple[str, str]]:
    """(image URL, caption) of each item of a gallery."""
    return [tuple(x) for x in driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(i => [i.src, i.alt]);",
        f"#{elem_id} .grid-container img")]


def fetch(url) -> bytes:
    """The body of a URL of the page (loopback only)."""
    assert urlparse(url).hostname == "127.0.0.1", url
    with urllib.request.urlopen(url, timeout=WAIT_S) as response:
        return response.read()


def downloads(driver) -> dict[str, str]:
    """File name -> URL of the download links."""
    return dict(driver.execute_script(
        "return [...document.querySelectorAll('#downloads a[download]')]"
        ".map(a => [a.getAttribute('download'), a.href]);"))


def decided_at(driver, value):
    """The download links once the files and the table are those of threshold ``value``."""
    links = downloads(driver)
    if "predictions.json" not in links:
        return None
    record = json.loads(fetch(links["predictions.json"]))
    if abs(record["threshold"]["value"] - value) > 1e-9:
        return None
    wanted = [r["decision"] for r in record["predictions"]]
    return links if [r[3] for r in table(driver)][:len(wanted)] == wanted else None


def set_threshold(driver, value):
    """Type a threshold into the slider's number box."""
    box = driver.find_element(By.CSS_SELECTOR, "#threshold input[type=number]")
    box.clear()
    box.send_keys(f"{value:.6f}")
    box.send_keys(Keys.ENTER)


def resource_urls(driver) -> list[str]:
    """Every URL the page has loaded (navigation and resources), as the browser lists them."""
    return driver.execute_script(
        "return performance.getEntries().map(e => e.name)"
        ".filter(n => /^[a-z]+:\\/\\//.test(n));")


# --------------------------------------------------------------------------------------------
# Tests


def test_page_scores_as_predict_images(app, browser, files, detector, tmp_path):
    """Two images and a corrupt file: the two scores, verdicts and overlays are those of
    predict_images on the same files and seed, the corrupt file gets its one line; a new
    threshold changes the verdicts, not the scores (nothing is scored again); the CSV
    download holds predict.py's columns; with references, K is shown and the scores are those
    of predict_images(..., references=...)."""
    parts = [files["part_a.png"], files["part_b.png"]]
    expected = predict_images(detector, parts, CLASS_NAME, seed=111)
    open_page(browser, app.url)
    upload(browser, "images", parts + [files["broken.png"]])
    type_class(browser, CLASS_NAME)
    rows = score(browser, 3)
    names = [r[0] for r in rows]
    assert names == ["part_a.png", "part_b.png", "broken.png"]
    shown = [float(r[1]) for r in rows[:2]]
    np.testing.assert_allclose(shown, [e["score"] for e in expected], atol=1e-6, rtol=0)
    assert [r[3] for r in rows] == [decide(e["score"], 0.5) for e in expected] + ["skipped"]
    message = browser.find_element(By.ID, "messages").text
    assert "cannot read image broken.png (UnidentifiedImageError" in message
    assert "2 images scored (zero-shot" in message and "1 skipped" in message

    # the overlays: at the original size, the heat map of predict_images's map
    items = gallery(browser)
    assert [alt.split(":")[0] for _, alt in items] == ["part_a.png", "part_b.png"]
    for (src, alt), path, e in zip(items, parts, expected):
        overlay = np.asarray(Image.open(io.BytesIO(fetch(src))).convert("RGB"))
        original = np.asarray(to_pil_image(path).convert("RGB"))
        assert overlay.shape == original.shape
        want = heat_overlay(original, e["anomaly_map"], vmin=0.0, vmax=1.0)
        assert np.abs(overlay.astype(int) - want).max() <= 1
        assert f"score {e['score']:.4f}" in alt

    # a threshold between the two scores: the verdicts change, the scores do not
    low, high = sorted(e["score"] for e in expected)
    middle = round(0.5 * (low + high), 6)
    set_threshold(browser, middle)
    links = wait(browser, lambda d: decided_at(d, middle))
    rows_after = table(browser)
    assert [r[1] for r in rows_after] == [r[1] for r in rows]
    assert [r[3] for r in rows_after] == [decide(e["score"], middle)
                                          for e in expected] + ["skipped"]
    assert sorted(r[3] for r in rows_after[:2]) == ["anomalous", "normal"]
    assert app.log().count("scored 2 images") == 1           # decided again, not scored again

    # the CSV download: predict.py's columns, the page's decisions, the skipped file
    table_csv = list(csv.DictReader(io.StringIO(fetch(links["predictions.csv"]).decode())))
    assert list(table_csv[0].keys()) == CSV_COLUMNS
    assert [r["path"] for r in table_csv] == names
    np.testing.assert_allclose([float(r["score"]) for r in table_csv[:2]],
                               [e["score"] for e in expected], atol=1e-7, rtol=0)
    np.testing.assert_allclose([float(r["map_score"]) for r in table_csv[:2]],
                               [e["map_score"] for e in expected], atol=1e-7, rtol=0)
    assert [r["decision"] for r in table_csv] == [decide(e["score"], middle)
                                                  for e in expected] + ["skipped"]
    assert "UnidentifiedImageError" in table_csv[2]["error"]
    record = json.loads(fetch(links["predictions.json"]))
    assert record["threshold"] == {"method": "fixed", "value": pytest.approx(middle, abs=1e-9),
                                   "rule": DECISION_RULE}
    assert record["provenance"]["weights"]["clip_sha256"]
    assert record["settings"]["seed"] == 111 and record["settings"]["sample_num"] == 10
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_binds_loopback_and_calls_nothing_outside(app, browser, files):
    """Started without --host, the page listens on 127.0.0.1 only; loading and using it makes
    no connection (DNS lookup included) to any other address, in the app or the browser."""
    open_page(browser, app.url)
    upload(browser, "images", [files["part_a.png"]])
    type_class(browser, "screw")
    score(browser, 1)
    assert gallery(browser)
    fetch(gallery(browser)[0][0])
    records = app.records()
    binds = [r for r in records if r["kind"] == "bind"]
    assert binds and all(r["address"].startswith("('127.0.0.1'") for r in binds), binds
    outbound = [r for r in records if r["kind"] != "bind"]
    assert outbound == []
    urls = resource_urls(browser)
    assert urls and all(urlparse(u).hostname in LOOPBACK for u in urls), urls


def test_the_guard_refuses_and_records(tmp_path):
    """The sitecustomize guard of these tests sees an outbound connection (so that the test
    above can fail)."""
    (tmp_path / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.jsonl"
    code = ("import socket\ntry:\n    socket.create_connection(('192.0.2.1', 80), timeout=1)\n"
            "except OSError as e:\n    print(e.errno)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path),
                              "PAGE_TEST_NET_LOG": str(log)}, timeout=WAIT_S)
    assert out.stdout.strip() == "101"
    assert "192.0.2.1" in log.read_text()


def test_references_few_shot_and_threshold_from_them(app, browser, files, detector):
    """Good references: K shown, the scores (and their spreads) those of predict_images(...,
    references=...); "set from the references' scores" gives predict.py's --calibrate rule on
    the references, each scored against the others in the few-shot mode (a reference compared
    with itself has a few-shot map of 0), as they are in the zero-shot mode."""
    parts = [files["part_a.png"], files["part_b.png"]]
    goods = [files["good_1.png"], files["good_2.png"]]
    expected = predict_images(detector, parts, CLASS_NAME, seed=111, references=goods,
                              return_std=True)
    zero_shot = predict_images(detector, parts, CLASS_NAME, seed=111)
    assert all(abs(a["score"] - b["score"]) > 1e-4 for a, b in zip(expected, zero_shot))
    open_page(browser, app.url)
    upload(browser, "images", parts)
    type_class(browser, CLASS_NAME)
    upload(browser, "references", goods)
    wait(browser, lambda d: "few-shot: K = 2" in d.find_element(By.ID, "shots").text)
    browser.find_element(By.CSS_SELECTOR, "#uncertainty input[type=checkbox]").click()
    rows = score(browser, 2)
    assert "2 images scored (few-shot, K = 2 reference images)" in \
        browser.find_element(By.ID, "messages").text
    np.testing.assert_allclose([float(r[1]) for r in rows], [e["score"] for e in expected],
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose([float(r[2]) for r in rows], [e["score_std"] for e in expected],
                               atol=1e-6, rtol=0)
    spreads = wait(browser, lambda d: gallery(d, "spreads"))
    assert [alt.split(":")[0] for _, alt in spreads] == ["part_a.png", "part_b.png"]

    held_out = [predict_images(detector, [g], CLASS_NAME, seed=111,
                               references=[o for o in goods if o != g])[0]["score"]
                for g in goods]
    want = calibrate_threshold(held_out, 100.0)
    browser.find_element(By.ID, "calibrate").click()
    links = wait(browser, lambda d: decided_at(d, want))
    record = json.loads(fetch(links["predictions.json"]))
    assert record["threshold"]["method"] == "calibrated"
    assert record["threshold"]["calibration"]["leave_one_out"] is True
    assert record["threshold"]["value"] == pytest.approx(want, abs=1e-12)
    assert record["references"]["n_images"] == 2
    assert [r["decision"] for r in record["predictions"]] == [decide(e["score"], want)
                                                              for e in expected]

    # zero-shot: the references only set the threshold, scored as the images are
    browser.find_element(By.CSS_SELECTOR, "#few_shot input[type=checkbox]").click()
    wait(browser, lambda d: "only set the threshold" in d.find_element(By.ID, "shots").text)
    rows = score(browser, 2)
    np.testing.assert_allclose([float(r[1]) for r in rows], [e["score"] for e in zero_shot],
                               atol=1e-6, rtol=0)
    want = calibrate_threshold([r["score"] for r in predict_images(detector, goods, CLASS_NAME,
                                                                   seed=111)], 100.0)
    browser.find_element(By.ID, "calibrate").click()
    wait(browser, lambda d: decided_at(d, want))


def test_sigterm_stops_the_page_and_removes_the_uploads(app):
    """SIGTERM ends the page used by the tests above (the last of them: it stops the module's
    app) with status 0, its folder of uploads and results removed."""
    work_dir = app.work_dir()
    assert os.path.isdir(os.path.join(work_dir, "runs"))       # the runs of the tests above
    assert app.stop(signal.SIGTERM) == 0
    assert not os.path.exists(work_dir)
    assert "stopping the page" in app.log()



# --------------------------------------------------------------------------------------------
# Without a browser: the weights, the limits, the stop


def test_no_weights_one_line(tmp_path):
    """No weight flags and no demo files: one line saying how to get either, exit 1."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "app.py")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=WAIT_S,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: no weights given and no demo files ({page_app.DEMO_CLIP}, "
        f"{page_app.DEMO_CHECKPOINT}): pass --pretrained_path and --checkpoint_path (real "
        "weights: pretrained_weight/README.md, bayes_weight/README.md) or run `python demo.py` "
        "first for random-weight demo files"]
    assert not any(p.name.startswith("bayes-pfl-page-") for p in tmp_path.iterdir())


def test_demo_files_are_the_default(tmp_path, monkeypatch):
    (tmp_path / "demo_output" / "train").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(page_app.WeightsError):
        page_app.choose_weights(None, None)
    (tmp_path / page_app.DEMO_CLIP).write_bytes(b"")
    (tmp_path / page_app.DEMO_CHECKPOINT).write_bytes(b"")
    assert page_app.choose_weights(None, None) == page_app.Weights(
        page_app.DEMO_CLIP, page_app.DEMO_CHECKPOINT, demo=True)
    assert page_app.choose_weights(None, "k.pth") == page_app.Weights(
        page_app.DEFAULT_CLIP, "k.pth", demo=False)


def test_limits_and_unreadable_files(detector, files, tmp_path):
    """Over the per-file size: that file's one line, the others scored; more images than
    --max_images, or no class name: one line and nothing scored."""
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(big)
    size = big.stat().st_size
    limits = page_app.Limits(max_images=3, max_file_bytes=size - 1)
    inspector = page_app.Inspector(detector, page_app.Weights("c", "k", False), {},
                                   str(tmp_path / "work"), limits)
    run = inspector.score([files["part_a.png"], str(big), files["broken.png"]], " bottle ", [],
                          True, 10, 111, False)
    assert [r["path"] for r in run.rows] == ["part_a.png"]
    assert run.rows[0]["score"] == pytest.approx(
        predict_images(detector, [files["part_a.png"]], CLASS_NAME, seed=111)[0]["score"],
        abs=1e-7)
    assert [s["error"] for s in run.skipped] == [
        f"image big.png is {size / 2 ** 20:.1f} MB, over the page's limit of "
        f"{(size - 1) / 2 ** 20:g} MB per file (--max_file_mb)",
        "cannot read image broken.png (UnidentifiedImageError: cannot identify image file "
        "'broken.png'); check that it is an image file and not damaged"]
    with pytest.raises(InputError, match=r"^4 images: the page takes at most 3 per run "
                                         r"\(--max_images\)$"):
        inspector.score([files["part_a.png"]] * 4, "bottle", [], True, 10, 111, False)
    with pytest.raises(InputError, match="^no class name"):
        inspector.score([files["part_a.png"]], "  ", [], True, 10, 111, False)
    with pytest.raises(InputError, match="needs at least 2 readable reference images"):
        inspector.calibrate([files["good_1.png"], files["broken.png"]], "bottle", True, 10,
                            111, 100.0)


def _signal_a_server_thread(pid: int, sig: int) -> None:
    """``sig`` delivered to one of the process's other threads (the kernel may pick any thread
    for a signal sent to the process)."""
    import ctypes
    import platform

    libc = ctypes.CDLL(None, use_errno=True)
    thread = max(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    number = {"x86_64": 234, "aarch64": 131}[platform.machine()]          # SYS_tgkill
    assert libc.syscall(number, pid, thread, int(sig)) == 0, ctypes.get_errno()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads of /proc: Linux")
def test_a_signal_caught_by_a_server_thread_still_stops_the_page(tiny_files, tmp_path):
    """The main thread notices a Ctrl-C the OS handed to another thread (it used to sleep on
    for an hour: the page hung). SIGTERM ends in the same KeyboardInterrupt of the main
    thread (utils.cli.interrupt_on_sigterm)."""
    server = App(str(tmp_path), tiny_files)
    work_dir = server.work_dir()
    _signal_a_server_thread(server.proc.pid, signal.SIGINT)
    try:
        assert server.wait_exit() == 0
    finally:
        server.stop()
    assert not os.path.exists(work_dir) and "stopping the page" in server.log()


def test_ctrl_c_removes_the_uploads(tiny_files, tmp_path):
    server = App(str(tmp_path), tiny_files)
    work_dir = server.work_dir()
    assert os.path.isdir(work_dir)
    assert server.stop(signal.SIGINT) == 0
    assert not os.path.exists(work_dir)
    assert "stopping the page" in server.log()
