#!/usr/bin/env python3
"""`make test`: the whole suite on ComfyUI 0.3.75, then the tiers whose behaviour depends on ComfyUI
(in-process, real server, real browser) again on ComfyUI 0.33.0, each in its own environment.

0.33.0 comes from ../shared/upstream (see scripts/setup_env.py); without that archive (a user's fresh
clone) it is skipped with one line saying why. With COMFYUI_DIR set (your own ComfyUI) the suite runs
once, on it. The tiers that start servers (e2e, browser) run in a pytest process of their own, before
the others (see SERVER_TIERS). Extra arguments go to every run; test paths among them replace the tier
selection (one run per ComfyUI then). The last line counts all runs: "matrix: N passed, N failed, N skipped".

Environment: LORA_LAB_TEST_COMFYUIS="0.3.75 0.33.0" picks the versions (default: all that can be set up).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from setup_env import DEFAULT_COMFYUI, available  # scripts/ is on sys.path: it holds this script

REPO_ROOT = Path(__file__).resolve().parent.parent

# On the second ComfyUI only what can behave differently there: everything that boots ComfyUI.
COMFYUI_TIERS = ["tests/e2e", "tests/browser", "tests/comfy"]
# The tiers that start ComfyUI servers run in a pytest process of their own, before the rest: their
# servers are session fixtures, alive until the process ends, and the in-process tier trains models as
# large as Flux in the test process itself. A 2-core, 24 GB machine cannot hold a server that trained
# the example workflows and that at once (CI's 0.33.0 run was OOM-killed so).
SERVER_TIERS = ["tests/e2e", "tests/browser"]


def tier_groups(tiers: list[str]) -> list[list[str]]:
    """The selection split into pytest runs: the server tiers, then the rest (no tiers = all of tests/)."""
    if not tiers:
        return [SERVER_TIERS, [f"--ignore={tier}" for tier in SERVER_TIERS]]
    groups = ([tier for tier in tiers if tier in SERVER_TIERS], [tier for tier in tiers if tier not in SERVER_TIERS])
    return [group for group in groups if group]


def counts(junit: Path) -> dict[str, int]:
    """passed / failed / skipped from a pytest junit file (errors count as failed)."""
    if not junit.is_file():
        return {"passed": 0, "failed": 1, "skipped": 0}   # pytest died before writing it
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    root = ElementTree.parse(junit).getroot()
    for suite in ([root] if root.tag == "testsuite" else root.iter("testsuite")):
        for key in totals:
            totals[key] += int(suite.get(key, 0))
    failed = totals["failures"] + totals["errors"]
    return {"passed": totals["tests"] - failed - totals["skipped"], "failed": failed, "skipped": totals["skipped"]}


def run_pytest(version: str | None, arguments: list[str], junit: Path) -> int:
    environment = dict(os.environ)
    if version is not None:
        environment["LORA_LAB_COMFYUI"] = version
    print(f"\n===== pytest on ComfyUI {version or os.environ.get('COMFYUI_DIR', '')}: {' '.join(arguments)} =====",
          flush=True)
    command = [sys.executable, str(REPO_ROOT / "scripts" / "setup_env.py"), "run", "--", "-m", "pytest", "-q", "-rs",
               "--durations=15", f"--junitxml={junit}", *arguments]   # the slowest tests, for keeping the suite short
    return subprocess.call(command, env=environment, cwd=REPO_ROOT)


def runs(version: str | None, arguments: list[str], tiers: list[str]) -> list[tuple[str | None, list[str]]]:
    """The pytest runs for one ComfyUI: the given selection as one run, or the tiers in groups."""
    if any(not argument.startswith("-") for argument in arguments):
        return [(version, arguments)]
    return [(version, [*arguments, *group]) for group in tier_groups(tiers)]


def main(arguments: list[str]) -> int:
    if os.environ.get("COMFYUI_DIR"):
        plan = runs(None, arguments, [])
    else:
        wanted = os.environ.get("LORA_LAB_TEST_COMFYUIS", "").split()
        plan = []
        for line in available():
            version, _, state = line.partition(" ")
            if wanted and version not in wanted:
                continue
            if state != "ok":
                print(f"ComfyUI {version} {state}", flush=True)
                continue
            plan += runs(version, arguments, [] if version == DEFAULT_COMFYUI else COMFYUI_TIERS)
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    status = 0
    with tempfile.TemporaryDirectory(prefix="lora-lab-junit-") as folder:
        for index, (version, pytest_arguments) in enumerate(plan):
            junit = Path(folder) / f"run{index}.xml"
            code = run_pytest(version, pytest_arguments, junit)
            found = counts(junit)
            for key in totals:
                totals[key] += found[key]
            label = " ".join(argument for argument in pytest_arguments if argument not in arguments) or "all tests"
            print(f"ComfyUI {version or 'COMFYUI_DIR'} ({label}): {found['passed']} passed, {found['failed']} failed, "
                  f"{found['skipped']} skipped (pytest exit {code})", flush=True)
            # pytest's 5 = nothing collected: a selection that matched no test is not a failure here.
            if code not in (0, 5):
                status = 1
    print(f"matrix: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
