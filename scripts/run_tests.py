#!/usr/bin/env python3
"""`make test`: the whole suite on ComfyUI 0.33.0 (what users run), then the compatibility subset on
ComfyUI 0.3.75: the tests marked `compat` (registered in pyproject.toml: the example workflows end to
end, the core train and dataset tests, the node schema). Each ComfyUI has its own environment.

0.33.0 comes from ../shared/upstream (see scripts/setup_env.py). Without that archive (a user's fresh
clone), or when LORA_LAB_TEST_COMFYUIS leaves it out, 0.3.75 runs the whole suite instead, said in one
line, so no test loses its run. With COMFYUI_DIR set (your own ComfyUI) the whole suite runs once, on
it. The tiers that start servers (e2e, browser) run in a pytest process of their own, before the
others (see SERVER_TIERS). Extra arguments go to every run; test paths among them replace the tier
selection (one run per ComfyUI then), and a `-m` of your own replaces the subset's `-m compat`.

`--fast` (`make test-fast`): tests/unit, then the in-process compat tests (tests/comfy -m compat), on
the default ComfyUI (LORA_LAB_COMFYUI, or COMFYUI_DIR, when set). `--plan`: print the runs, run nothing.

Each ComfyUI is set up first (timed); the summary gives every pytest run with its wall seconds, the
set-up and the total, and ends with the line that counts all runs: "matrix: N passed, N failed, N skipped".

Environment: LORA_LAB_TEST_COMFYUIS="0.3.75 0.33.0" picks the versions (default: all that can be set up).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from setup_env import DEFAULT_COMFYUI, available  # scripts/ is on sys.path: it holds this script

REPO_ROOT = Path(__file__).resolve().parent.parent

# The ComfyUI that runs every test; the others run the tests marked COMPAT_MARK.
FULL_COMFYUI = "0.33.0"
COMPAT_MARK = "compat"
# The tiers that start ComfyUI servers run in a pytest process of their own, before the rest: their
# servers are session fixtures, alive until the process ends, and the in-process tier trains models as
# large as Flux in the test process itself. A 2-core, 24 GB machine cannot hold a server that trained
# the example workflows and that at once (CI's 0.33.0 run was OOM-killed so).
SERVER_TIERS = ["tests/e2e", "tests/browser"]
# make test-fast: the library, then the in-process core.
FAST_RUNS = [["tests/unit"], ["-m", COMPAT_MARK, "tests/comfy"]]

Run = tuple[str | None, list[str]]   # (ComfyUI version, None = COMFYUI_DIR; pytest arguments)


def tier_groups() -> list[list[str]]:
    """All of tests/ as two pytest runs: the server tiers, then the rest (--ignore: a new tier is never left out)."""
    return [SERVER_TIERS, [f"--ignore={tier}" for tier in SERVER_TIERS]]


def selects_tests(arguments: list[str]) -> bool:
    """Whether the arguments name test paths (tests/comfy/test_train.py, tests/e2e::test_x ...)."""
    return any(not argument.startswith("-") and (REPO_ROOT / argument.split("::")[0]).exists()
               for argument in arguments)


def runs(version: str | None, arguments: list[str], subset: bool) -> list[Run]:
    """The pytest runs for one ComfyUI: the whole suite or (subset) the compat tests, in tier groups, or
    the given test paths as one run."""
    selection = ["-m", COMPAT_MARK] if subset else []
    if selects_tests(arguments):
        return [(version, [*selection, *arguments])]
    return [(version, [*selection, *arguments, *group]) for group in tier_groups()]


def usable_comfyuis() -> tuple[list[str], dict[str, str]]:
    """The managed ComfyUIs to test (those LORA_LAB_TEST_COMFYUIS names, default all, that can be set up),
    and why each other one is left out."""
    wanted = os.environ.get("LORA_LAB_TEST_COMFYUIS", "").split()
    usable, left_out = [], {}
    for line in available():
        version, _, state = line.partition(" ")
        if wanted and version not in wanted:
            left_out[version] = "skipped: not in LORA_LAB_TEST_COMFYUIS"
        elif state != "ok":
            left_out[version] = state
        else:
            usable.append(version)
    return usable, left_out


def plan(arguments: list[str], fast: bool = False) -> list[Run]:
    """Every pytest run of this invocation, in order."""
    if fast:
        version = None if os.environ.get("COMFYUI_DIR") else os.environ.get("LORA_LAB_COMFYUI") or DEFAULT_COMFYUI
        return [(version, [*run, *arguments]) for run in FAST_RUNS]
    if os.environ.get("COMFYUI_DIR"):
        return runs(None, arguments, subset=False)
    usable, left_out = usable_comfyuis()
    full = FULL_COMFYUI if FULL_COMFYUI in usable else usable[0] if usable else None
    for version, why in left_out.items():   # one line each; the full suite's fallback is said in the same line
        instead = f"; ComfyUI {full} runs the whole suite instead" if version == FULL_COMFYUI and full else ""
        print(f"ComfyUI {version} {why}{instead}", flush=True)
    ordered = [full, *(version for version in usable if version != full)] if full else []
    return [run for version in ordered for run in runs(version, arguments, subset=version != full)]


def environment_for(version: str | None) -> dict[str, str]:
    environment = dict(os.environ)
    if version is not None:
        environment["LORA_LAB_COMFYUI"] = version
    return environment


def set_up(version: str | None) -> int:
    """Provision one ComfyUI's environment (idempotent; fast when done)."""
    print(f"\n===== set-up of ComfyUI {version or os.environ.get('COMFYUI_DIR', '')} =====", flush=True)
    return subprocess.call([sys.executable, str(REPO_ROOT / "scripts" / "setup_env.py")],
                           env=environment_for(version), cwd=REPO_ROOT)


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
    print(f"\n===== pytest on ComfyUI {version or os.environ.get('COMFYUI_DIR', '')}: {' '.join(arguments)} =====",
          flush=True)
    command = [sys.executable, str(REPO_ROOT / "scripts" / "setup_env.py"), "run", "--", "-m", "pytest", "-q", "-rs",
               "--durations=15", f"--junitxml={junit}", *arguments]   # the slowest tests, for keeping the suite short
    return subprocess.call(command, env=environment_for(version), cwd=REPO_ROOT)


def name(version: str | None) -> str:
    return f"ComfyUI {version or 'COMFYUI_DIR'}"


def main(argv: list[str]) -> int:
    started = time.monotonic()
    options = {"--plan", "--fast"}
    arguments = [argument for argument in argv if argument not in options]
    runs_planned = plan(arguments, fast="--fast" in argv)
    if "--plan" in argv:
        for version, pytest_arguments in runs_planned:
            print(f"{name(version)}: pytest {' '.join(pytest_arguments)}")
        return 0
    summary: list[str] = []
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    status = 0
    set_up_seconds = pytest_seconds = 0.0
    failed_set_up = set()
    for version in dict.fromkeys(version for version, _ in runs_planned):
        begun = time.monotonic()
        code = set_up(version)
        seconds = time.monotonic() - begun
        set_up_seconds += seconds
        summary.append(f"set-up of {name(version)}: {seconds:.0f} s" + (f" (failed: exit {code})" if code else ""))
        if code:
            failed_set_up.add(version)
    with tempfile.TemporaryDirectory(prefix="lora-lab-junit-") as folder:
        for index, (version, pytest_arguments) in enumerate(runs_planned):
            label = " ".join(argument for argument in pytest_arguments if argument not in arguments) or "all tests"
            if version in failed_set_up:
                found, code, seconds = {"passed": 0, "failed": 1, "skipped": 0}, "not run: set-up failed", 0.0
            else:
                junit = Path(folder) / f"run{index}.xml"
                begun = time.monotonic()
                code = run_pytest(version, pytest_arguments, junit)
                seconds = time.monotonic() - begun
                pytest_seconds += seconds
                found = counts(junit)
            for key in totals:
                totals[key] += found[key]
            line = (f"{name(version)} ({label}): {found['passed']} passed, {found['failed']} failed, "
                    f"{found['skipped']} skipped in {seconds:.0f} s (pytest exit {code})")
            print(line, flush=True)
            summary.append(line)
            # pytest's 5 = nothing collected: a selection that matched no test is not a failure here.
            if code not in (0, 5):
                status = 1
    print("\n===== summary =====", flush=True)
    print("\n".join(summary), flush=True)
    print(f"time: set-up {set_up_seconds:.0f} s + pytest {pytest_seconds:.0f} s, "
          f"total {time.monotonic() - started:.0f} s", flush=True)
    print(f"matrix: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
