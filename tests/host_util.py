"""Shared by the integration suites that run a real host (tests/webui/: AUTOMATIC1111, tests/forge/:
Forge): the HTTP client of a started server, its folder's python and installer, linking this project in
as `extensions/bdm`, stopping it, the responses' images and fields, the toy judge, and the browser.

A plain helper module (no fixtures): each suite's conftest builds its own fixtures on it."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def screenshot_dir() -> Path:
    """Where the browser tests save their screenshots: $BDM_SCREENSHOTS (`docs/screenshots` refreshes the
    docs' pictures), else a temporary folder, so that a test run leaves the checkout clean."""
    return Path(os.environ.get("BDM_SCREENSHOTS") or Path(tempfile.gettempdir()) / "bdm-screenshots")


def mark_suite(items, folder: Path, marker, available: bool, skip_reason: str) -> None:
    """Mark the tests collected from `folder` (a host suite) with `marker`; skip them when the host is
    not available (its `*_DIR` is not set)."""
    for item in items:
        if Path(str(item.fspath)).is_relative_to(folder):
            item.add_marker(marker)
            if not available:
                item.add_marker(pytest.mark.skip(reason=skip_reason))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_python(host_dir: Path) -> str:
    """The host's venv python (the harnesses keep it at `HOST_DIR/../venv`), else this python."""
    venv = Path(host_dir).parent / "venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class WebUI:
    """A started WebUI (AUTOMATIC1111 or Forge) and its HTTP API."""

    ERROR_KEY = "errors"  # the message's key in the API's error body (A1111's `api.py` handle_exception)

    def __init__(self, url: str, host_dir: Path, proc, auth: tuple[str, str] | None = None):
        self.url, self.dir, self.proc = url, host_dir, proc
        self.headers = {}
        if auth:
            self.headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()

    def call(self, method: str, path: str, payload=None, timeout: float = 600, headers: dict | None = None):
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(self.headers if headers is None else headers)})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def post(self, path: str, payload=None):
        status, body = self.call("POST", path, payload)
        assert status == 200, f"{path}: HTTP {status}: {str(body)[:2000]}"
        return body

    def get(self, path: str):
        status, body = self.call("GET", path)
        assert status == 200, f"{path}: HTTP {status}: {str(body)[:2000]}"
        return body

    def txt2img(self, **payload):
        return self.post("/sdapi/v1/txt2img", payload)

    def txt2img_status(self, **payload):
        """(HTTP status, body) of a txt2img request that may fail."""
        return self.call("POST", "/sdapi/v1/txt2img", payload)

    def error_message(self, body: dict) -> str:
        return body[self.ERROR_KEY]

    def state(self) -> dict:
        """The diagnostics of the suite's test-only support extension."""
        return self.get("/bdm-test/state")

    def alive(self) -> bool:
        return self.proc.poll() is None and self.call("GET", "/sdapi/v1/sd-models", timeout=30)[0] == 200


def stop_server(server: WebUI) -> None:
    from bdm.bench.webui import stop
    stop(server.proc)
    server._log_file.close()


def bare_models_dir(host_dir: Path, name: str) -> tuple[Path, Path]:
    """(models folder, settings file) for a second server with no BDM model installed: `/tmp/<name>-models`
    whose subfolders link to the host's, except an empty `bdm`, and a copy of the host's config.json (so
    that the second server never writes the first one's)."""
    models = Path(f"/tmp/{name}-models")
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    for sub in (Path(host_dir) / "models").iterdir():
        if sub.is_dir() and sub.name != "bdm":
            (models / sub.name).symlink_to(sub, target_is_directory=True)
    (models / "bdm").mkdir()
    settings = Path(f"/tmp/{name}-config.json")
    shutil.copyfile(Path(host_dir) / "config.json", settings)
    return models, settings


def link_extension(host_dir: Path) -> None:
    """`HOST_DIR/extensions/bdm` → this project (refuses to touch anything else there)."""
    ext = Path(host_dir) / "extensions" / "bdm"
    if ext.is_symlink() or ext.exists():
        if ext.resolve() != REPO.resolve():
            pytest.exit(f"{ext} exists and is not this project ({REPO}); move it away first", 2)
        return
    ext.symlink_to(REPO, target_is_directory=True)


def run_installer(host_dir: Path) -> str:
    """The extension's install.py run exactly as the host runs installers at start (its own
    `launch_utils.run_extension_installer`: the host's python, PYTHONPATH, `launch.run_pip`)."""
    code = ("import sys; sys.argv = ['launch.py']\n"
            "from modules import launch_utils\n"
            "assert not launch_utils.args.skip_install\n"
            "launch_utils.run_extension_installer('extensions/bdm')\n")
    r = subprocess.run([host_python(host_dir), "-c", code], cwd=host_dir, capture_output=True, text=True,
                       timeout=600)
    return r.stdout + r.stderr + f"\nexit code {r.returncode}"



def wait_until_ready(server, name: str, ready, timeout: float = 300):
    """Poll `ready(server)` (true once the host serves what the tests need) every 2 s and return the
    server; fail with the log's path when the host exits or does not get there within `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.proc.poll() is not None:
            stop_server(server)
            pytest.fail(f"{name} exited with {server.proc.returncode}; see {server.log}")
        try:
            if ready(server):
                return server
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(2)
    stop_server(server)
    pytest.fail(f"{name} did not answer within {timeout:.0f} s; see {server.log}")

def host_session(folder: str | None, skip_reason: str, prepare, start, base: dict):
    """The session fixture of a host suite (a generator: yields the started server): skips without the
    host's folder; else `prepare(root)` (models, test extensions; kept as `server.prepared`), the
    extension's installer (`server.installer_output`), `start(root)`, the first image made before the
    extension was ever used in this server (`server.baseline`, from `base`), and the server stopped at
    the end whatever happened."""
    if not folder:
        pytest.skip(skip_reason)
    root = Path(folder).resolve()
    prepared = prepare(root)
    installer = run_installer(root)
    server = start(root)
    server.prepared, server.installer_output = prepared, installer
    try:
        server.baseline = server.txt2img(**base)
        yield server
    finally:
        stop_server(server)

# -- the browser ------------------------------------------------------------------------------------
def chromium_paths():
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return browser, driver


def chromium():
    """A headless Chromium driven by selenium (a generator for a fixture: yields the driver, quits it
    after); skips when Chromium, its driver or selenium is missing."""
    path, driver = chromium_paths()
    if not path or not driver:
        pytest.skip("headless Chromium is not installed (Debian packages chromium, chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = path
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='bdm-chromium-')}", "--window-size=1280,1400",
                 "--lang=zh-CN"):
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        yield d
    finally:
        d.quit()


def wait_for(condition, timeout=120.0, every=0.5, what="condition", seen=None):
    """`condition()` once true; `seen()` says what was there instead when it never is. An element the page
    replaced while it was read (the token counter's span is replaced at each count) counts as not yet."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = condition()
        except Exception as e:  # noqa: BLE001 - selenium is imported only where a browser test runs
            if type(e).__name__ != "StaleElementReferenceException":
                raise
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f"; found {seen()!r}" if seen else ""))


class Page:
    """The WebUI in the browser, with the few moves a user makes."""

    def __init__(self, d, url, shots: Path, prefix: str = ""):
        """`shots`: the folder of `shot(name)`'s screenshots, each named `prefix + name`."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        self.d, self.By, self.Keys = d, By, Keys
        self.shots, self.prefix = Path(shots), prefix
        d.get(url)
        wait_for(lambda: self.css("#bdm_txt2img_cn_prompt_container.bdm-placed"), what="the UI, with the boxes placed")
        time.sleep(2)  # the load events (the model dropdown's value) and the token counters

    def css(self, selector):
        return self.d.find_elements(self.By.CSS_SELECTOR, selector)

    def one(self, selector):
        return self.d.find_element(self.By.CSS_SELECTOR, selector)

    def y(self, elem_id):
        r = self.d.find_element(self.By.ID, elem_id).rect
        return r["y"], r["y"] + r["height"]

    def type(self, selector, text, clear=True):
        box = self.one(selector)
        if clear:
            box.click()
            box.send_keys(self.Keys.CONTROL, "a")
            box.send_keys(self.Keys.DELETE)
        box.send_keys(text)
        return box

    def small_settings(self, tab="txt2img"):
        for elem, value in ((f"{tab}_width", "64"), (f"{tab}_height", "64"), (f"{tab}_steps", "4")):
            self.type(f"#{elem} input[type=number]", value).send_keys(self.Keys.TAB)

    def enabled(self, tab="txt2img"):
        return self.one(f"#bdm_{tab}_enabled input[type=checkbox]")

    def choose_model(self, title):
        box = self.type("#bdm_txt2img_model input", title)
        time.sleep(0.5)
        box.send_keys(self.Keys.ENTER)
        box.send_keys(self.Keys.TAB)

    def generate(self):
        """Ctrl+Enter in the Chinese box; returns when the new result (image or error) is shown: the
        WebUI shows its Interrupt button while it generates, and then the new log under the image."""
        from selenium.webdriver.common.action_chains import ActionChains
        log = lambda: self.one("#html_log_txt2img").get_attribute("innerHTML")  # noqa: E731
        busy = lambda: self.one("#txt2img_interrupt").is_displayed()  # noqa: E731
        before = log()
        self.one("#bdm_txt2img_cn_prompt textarea").click()
        ActionChains(self.d).key_down(self.Keys.CONTROL).send_keys(self.Keys.ENTER).key_up(self.Keys.CONTROL).perform()
        wait_for(busy, 30, 0.05, what="the generation to start")
        wait_for(lambda: not busy() and log() != before and "Time taken" in self.one("#html_log_txt2img").text,
                 timeout=300, what="the generation to end")
        time.sleep(1)

    def shot(self, name):
        from PIL import Image
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / (self.prefix + name)
        self.d.execute_script("window.scrollTo(0, 0)")
        self.d.save_screenshot(str(path))
        Image.open(path).convert("RGB").quantize(128).save(path, optimize=True)  # a small PNG for docs/
        return path


# -- responses ---------------------------------------------------------------------------------------
def pixels(response) -> list:
    from PIL import Image
    return [np.array(Image.open(io.BytesIO(base64.b64decode(b)))) for b in response["images"]]


def same(a, b, n: int | None = None) -> bool:
    pa, pb = pixels(a)[:n], pixels(b)[:n]
    return len(pa) == len(pb) and all(np.array_equal(x, y) for x, y in zip(pa, pb))


def max_diff(a, b, n: int | None = None) -> int:
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(pixels(a)[:n], pixels(b)[:n]))


def mean_diff(a, b, n: int | None = None) -> float:
    return min(float(np.abs(x.astype(int) - y.astype(int)).mean()) for x, y in zip(pixels(a)[:n], pixels(b)[:n]))


def info(r) -> dict:
    return json.loads(r["info"])


def bdm_error(r) -> str:
    return info(r)["extra_generation_params"].get("BDM error", "")


def rate(values, target) -> float:
    return sum(v == target for v in values) / max(1, len(values))


def png_b64(array: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def hint(position: int, toy: bool) -> str:
    """A control image: the toy's bounding-box hint for grid cell `position` (white filled box on
    black), drawn the same way for the synthetic ControlNet."""
    if toy:
        from bdm.toy import domain as D
        return png_b64(np.asarray(D.hint_for(position).convert("RGB")))
    a = np.zeros((64, 64, 3), np.uint8)
    r, c = divmod(position, 3)
    a[4 + 20 * r:20 + 20 * r, 4 + 20 * c:20 + 20 * c] = 255
    return png_b64(a)


class ToyJudge:
    """The toy world's judge (bdm/toy/models.py `Judge`, weights bdm/toy/weights/bdm-toy-judge.safetensors)."""

    def __init__(self):
        import torch
        from bdm.formats.files import read_state_dict
        from bdm.toy import paths
        from bdm.toy.models import Judge
        self.torch = torch
        self.model = Judge()
        self.model.load_state_dict(read_state_dict(paths.judge_file()))
        self.model.eval()

    def __call__(self, response, n: int | None = None) -> dict:
        """Predicted attribute names per image (the first `n` images: results, not control maps)."""
        from bdm.toy import domain as D
        imgs = pixels(response)[:n]
        x = self.torch.from_numpy(np.stack(imgs)[..., :3]).permute(0, 3, 1, 2).float() / 127.5 - 1
        pred = self.model.predict(x)
        names = {"colour": D.COLOURS, "shape": D.SHAPES, "size": D.SIZES, "background": D.BACKGROUNDS,
                 "drawing": D.DRAWINGS}
        out = {k: [names[k][int(i)] for i in pred[k]] for k in names}
        out["position"] = [int(i) for i in pred["position"]]
        return out
