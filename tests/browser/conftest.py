from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.server import ComfyServer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts"
# Chromium on these machines: no sandbox as root, and no background network traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def ui_server(comfyui_dir, tmp_path_factory):
    """A real ComfyUI server serving the real graph editor (comfyui-frontend-package)."""
    pytest.importorskip("comfyui_frontend_package", reason="the ComfyUI frontend package is not installed")
    instance = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("ui-base"), with_frontend=True).start()
    # A returning user: no first-run templates dialog over the canvas.
    status, _ = instance.request("POST", "/settings/Comfy.TutorialCompleted", True)
    assert status == 200
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.skip("Debian's chromium is not installed (make setup installs it where it can)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture
def page(browser, ui_server):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(ui_server.url, wait_until="networkidle", timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph && "
                           "window.loraLabSchedulePreview", timeout=120_000)
    # The editor loads its start-up workflow asynchronously and replaces the graph: let it, then
    # start each test from an empty graph.
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1000)
    page.evaluate("() => app.graph.clear()")
    page.keyboard.press("Escape")  # the first-run templates dialog
    page.wait_for_timeout(300)
    page.loraLabErrors = errors
    ARTIFACTS.mkdir(exist_ok=True)
    yield page
    context.close()
