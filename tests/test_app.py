"""app.py in a real browser: headless Chromium (Debian's) driven by Playwright loads the page,
uploads an image, reads the scores and the tile view, and takes a screenshot."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, make_image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_analyses_an_uploaded_image(converted, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Debian chromium: `make browser` installs it (make test does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--model", str(converted["ca"]), "--port",
                               str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 900  # only against a hang: the wait ends when the server answers or dies
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail(f"app did not start: {server.stdout.read().decode()[-2000:] if server.poll() else ''}")
                time.sleep(0.5)
        image = tmp_path / "upload.png"
        make_image(300, 200, seed=4).save(image)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("input[type=file]", state="attached", timeout=30000)
            page.set_input_files("input[type=file]", str(image))
            page.get_by_role("button", name="Analyse").click()
            page.get_by_text("Five tiles").wait_for(timeout=30000)
            page.wait_for_function("document.body.innerText.includes('Chromatic Aberration')"
                                   " && document.body.innerText.includes('%')", timeout=30000)
            text = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            browser.close()
        assert "Chromatic Aberration" in text and "Pass" in text
        assert "%" in text  # gr.Label shows confidences as percentages
        assert (tmp_path / "demo.png").stat().st_size > 10000
    finally:
        server.terminate()
        server.wait(timeout=20)
