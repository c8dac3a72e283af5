"""The Gradio app: the request handler, the `mllm-ris app` command, the upload limit over HTTP, and the page
served on localhost driven in headless Chromium (Debian's chromium + chromium-driver, selenium):
upload an image, type a query, press Segment, receive the overlay. Skipped, with the reason shown,
where gradio, selenium, chromium or chromedriver is missing (`.ci/run` installs them)."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from _launch_kit import free_port
from test_pipeline_kit import scene_image, write_png

from mllm_ris.cli import main
from mllm_ris.errors import NotAvailableError
from mllm_ris.inference import app as app_module
from mllm_ris.inference import scenes as sc
from mllm_ris.inference.pipeline import InputError, RISPipeline

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def test_segment_for_app(pipe: RISPipeline, tmp_path: Path) -> None:
    path = write_png(tmp_path / "s.png", scene_image(48, 64))
    shown, answer, details = app_module.segment_for_app(pipe, str(path), "the red circle")
    assert shown.shape == (48, 64, 3) and shown.dtype == np.uint8
    assert answer.startswith('"') and details["height"] == 48
    with pytest.raises(InputError, match="upload an image first"):
        app_module.segment_for_app(pipe, None, "x")
    with pytest.raises(InputError, match="query: empty"):
        app_module.segment_for_app(pipe, str(path), "")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        app_module.segment_for_app(pipe, str(tmp_path / "bad.png"), "x")


def test_app_command_defaults_to_localhost(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, object] = {}
    monkeypatch.setattr(app_module, "launch", lambda pipeline, **kw: seen.update(kw, pipeline=pipeline))
    assert main(["app", "--model", str(model_dir)]) == 0
    assert seen["host"] == "127.0.0.1" and seen["max_file_size"] == "10mb" and seen["port"] == 7860
    assert main(["app", "--model", str(model_dir / "missing")]) == 2
    assert capsys.readouterr().err.startswith("mllm-ris: error: model folder not found")


def test_missing_gradio_is_one_line(pipe: RISPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with pytest.raises(NotAvailableError, match=r"pip install 'mllm-ris\[demo\]'"):
        app_module.build_app(pipe)


@pytest.fixture(scope="module")
def served(pipe: RISPipeline) -> Iterator[str]:
    """The app on a free localhost port with a 1 MB upload limit; yields its URL."""
    pytest.importorskip("gradio", reason="gradio is not installed (pip install 'mllm-ris[demo]')")
    real_connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: object) -> None:  # this process never leaves the host
        host = address[0] if isinstance(address, tuple) else str(address)
        assert sock.family == socket.AF_UNIX or host in ("127.0.0.1", "localhost", "::1"), address
        real_connect(sock, address)

    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", loopback_only)
        app = app_module.launch(pipe, port=port, max_file_size="1mb", block=False, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            app.close()


def test_app_serves_on_localhost_with_an_upload_limit(served: str) -> None:
    import httpx

    assert served.startswith("http://127.0.0.1:")
    with httpx.Client(timeout=30, trust_env=False) as client:  # loopback only, no proxies
        assert client.get(f"{served}/").status_code == 200
        small = client.post(f"{served}/gradio_api/upload", files={"files": ("a.png", b"x" * 1000)})
        assert small.status_code == 200
        big = client.post(f"{served}/gradio_api/upload", files={"files": ("b.png", b"x" * 2_000_000)})
        assert big.status_code == 413  # over max_file_size


def _chromium_driver() -> WebDriver:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "Debian's chromium / chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium-manager download anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1000",
    ):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_app_in_headless_chromium(served: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chromium_driver()
    try:
        driver.get(served)
        wait = WebDriverWait(driver, 90)
        upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"))[0]
        upload.send_keys(str(write_png(tmp_path / "scene.png", scene_image(48, 64))))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))
        driver.find_element(By.CSS_SELECTOR, "#query textarea").send_keys("the red circle")
        driver.find_element(By.CSS_SELECTOR, "#segment").click()
        overlay = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay img"))[0]
        answer = wait.until(
            lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
        )
        assert "mask" in answer and overlay.get_attribute("src").startswith(served)
        size = driver.execute_script(
            "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay
        )
        assert size == [64, 48]  # the overlay is the uploaded image's size
        if sc.bundled_scenes():
            assert sc.bundled_scenes()[0].queries[0]["text"] in driver.page_source  # the examples
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert [r for r in resources if not r.startswith(served)] == []  # nothing from the network
    finally:
        driver.quit()
