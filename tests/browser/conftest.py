from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lora_lab_devtools.comfy_server import ComfyServer
from lora_lab_devtools.environment import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts"
# Chromium on these machines: no sandbox as root, and no background network traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# The graph editors every browser test runs in: the one this ComfyUI pins (its requirements.txt), and
# the newest on the registry (scripts/setup_env.py NEWEST_FRONTEND, unpacked into the cache).
FRONTENDS = ["pinned", "newest"]
# Canvas nodes, and "Nodes 2.0" (Vue-rendered nodes, setting Comfy.VueNodes.Enabled).
MODES = ["classic", "nodes2"]


@pytest.fixture(scope="session", params=FRONTENDS)
def ui_server(request, comfyui_dir, tmp_path_factory):
    """A real ComfyUI server serving a real graph editor (comfyui-frontend-package)."""
    if request.param == "newest":
        root = os.environ.get("LORA_LAB_NEWEST_FRONTEND", "")
        if not root or not (Path(root) / "index.html").is_file():
            pytest.skip("the newest frontend is not unpacked (make setup does it; not with COMFYUI_DIR)")
        instance = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("ui-base"), front_end_root=Path(root)).start()
    else:
        pytest.importorskip("comfyui_frontend_package", reason="the ComfyUI frontend package is not installed")
        instance = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("ui-base"), with_frontend=True).start()
    instance.frontend_kind = request.param
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


@pytest.fixture(params=MODES)
def page(request, browser, ui_server):
    status, _ = ui_server.request("POST", "/settings/Comfy.VueNodes.Enabled", request.param == "nodes2")
    assert status == 200
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
    version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? 'unknown'")
    comfyui = os.environ.get("LORA_LAB_COMFYUI_VERSION", "comfyui")
    # Screenshots: test-artifacts/<name>__comfyui-<version>_frontend-<version>_<mode>.png
    page.loraLabTag = f"comfyui-{comfyui}_frontend-{version}_{request.param}"
    page.loraLabMode = request.param
    ARTIFACTS.mkdir(exist_ok=True)
    yield page
    context.close()


def artifact(page, name: str) -> str:
    """Where a screenshot goes: test-artifacts/, named for the ComfyUI, frontend and node mode it shows."""
    stem, _, suffix = name.rpartition(".")
    return str(ARTIFACTS / f"{stem}__{page.loraLabTag}.{suffix}")
