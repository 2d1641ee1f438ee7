#!/usr/bin/env python3
"""`make test`: the whole suite on ComfyUI 0.33.0 (what users run), then the compatibility subset on
ComfyUI 0.3.75: the tests marked `compat` (registered in pyproject.toml: the example workflows end to
end, the core train and dataset tests, the node schema). Each ComfyUI has its own environment.

0.33.0 comes from ../shared/upstream (see scripts/setup_env.py). Without that archive (a user's fresh
clone), or when LORA_LAB_TEST_COMFYUIS leaves it out, 0.3.75 runs the whole suite instead, said in one
line, so no test loses its run. With COMFYUI_DIR set (your own ComfyUI) the whole suite runs once, on
it. Extra arguments go to every run; test paths among them replace the tier selection (one run per
ComfyUI then), and a `-m` of your own replaces the subset's `-m compat`.

Side by side. The suite is CPU training of small models, and one pytest process with torch's threads
keeps two cores about 70 % busy (a test runs 1.36x faster on 2 threads than on 1). So the work is cut
into pytest runs that go side by side, each with one thread per core it gets: the set-up of each
ComfyUI, the server tiers (tests/e2e, tests/browser: each its own process with its own servers) and
the in-process tier (tests/comfy, tests/unit) in shards of whole files, balanced by the seconds each
file took (tests/durations.json, the compat subset's as "compat:<file>"; `--record-durations` updates it
from a run). The longest runs start
first; a ComfyUI's runs wait for its set-up. LORA_LAB_TEST_JOBS sets how many run at once (default:
the cores, at most one per 8 GiB of memory). Each run's output is printed whole when it ends.

Memory. Test processes get glibc's MALLOC_MMAP_THRESHOLD_ of 4 MiB: tensors from 4 MiB up are mapped
and unmapped with their lifetime instead of coming from heap arenas that fragment. Measured on the SD3
test: 11.4 GB peak resident without it, 6.0 GB with it, 14 % more time; without it two runs side by
side could not fit a 24 GB machine. The summary gives the machine's peak memory in use during the runs.

`--fast` (`make test-fast`): tests/unit, then the in-process compat tests (tests/comfy -m compat), on
the default ComfyUI (LORA_LAB_COMFYUI, or COMFYUI_DIR, when set). `--plan`: print the runs, run nothing.

The summary gives every run with its wall seconds, each tier's (set-up, server tiers, in-process
tier, per ComfyUI), the total, and ends with the line that counts all runs: "matrix: N passed, N
failed, N skipped".

Environment: LORA_LAB_TEST_COMFYUIS="0.3.75 0.33.0" picks the versions (default: all that can be set up).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

from setup_env import DEFAULT_COMFYUI, available  # scripts/ is on sys.path: it holds this script

REPO_ROOT = Path(__file__).resolve().parent.parent

# The ComfyUI that runs every test; the others run the tests marked COMPAT_MARK.
FULL_COMFYUI = "0.33.0"
COMPAT_MARK = "compat"
# The tiers that start ComfyUI servers: each runs in a pytest process of its own (its servers are session
# fixtures, alive until the process ends), never sharded.
SERVER_TIERS = ["tests/e2e", "tests/browser"]
# make test-fast: the library, then the in-process core.
FAST_RUNS = [["tests/unit"], ["-m", COMPAT_MARK, "tests/comfy"]]
# Seconds each test file took (its tests' junit times: one thread, side by side), for balancing shards.
DURATIONS = REPO_ROOT / "tests" / "durations.json"
UNKNOWN_FILE_SECONDS = 30.0      # a file not in DURATIONS yet
SHARD_SECONDS = 300.0            # the in-process tier is cut into shards of about this much work
MMAP_THRESHOLD = str(4 * 1024 * 1024)
GIB = 1024 ** 3


@dataclass
class Run:
    version: str | None            # the ComfyUI (None = COMFYUI_DIR)
    arguments: list[str]           # pytest's
    tier: str                      # what the summary sums it under
    cost: float = 0.0              # estimated seconds, for the order
    label: str = ""
    junit: Path | None = None
    result: dict = field(default_factory=dict)


def name(version: str | None) -> str:
    return f"ComfyUI {version or 'COMFYUI_DIR'}"


def durations() -> dict[str, float]:
    return json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}


def in_process_files() -> list[str]:
    """Every test file outside the server tiers, in collection order (tests/comfy before tests/unit)."""
    tests = REPO_ROOT / "tests"
    files = sorted({*tests.rglob("test_*.py"), *tests.rglob("*_test.py")})
    return [path.relative_to(REPO_ROOT).as_posix() for path in files
            if not any(path.relative_to(REPO_ROOT).as_posix().startswith(tier + "/") for tier in SERVER_TIERS)]


def shards(files: list[str], seconds: dict[str, float]) -> list[tuple[list[str], float]]:
    """`files` in groups of about SHARD_SECONDS of work each (the longest file first into the lightest
    group), each group in collection order, with its estimated seconds."""
    cost = {file: seconds.get(file, UNKNOWN_FILE_SECONDS) for file in files}
    count = max(1, math.ceil(sum(cost.values()) / SHARD_SECONDS))
    groups: list[list[str]] = [[] for _ in range(count)]
    totals = [0.0] * count
    for file in sorted(files, key=lambda file: -cost[file]):
        lightest = totals.index(min(totals))
        groups[lightest].append(file)
        totals[lightest] += cost[file]
    return [(sorted(group), total) for group, total in zip(groups, totals) if group]


def selects_tests(arguments: list[str]) -> bool:
    """Whether the arguments name test paths (tests/comfy/test_train.py, tests/e2e::test_x ...)."""
    return any(not argument.startswith("-") and (REPO_ROOT / argument.split("::")[0]).exists()
               for argument in arguments)


def runs_for(version: str | None, arguments: list[str], subset: bool) -> list[Run]:
    """The pytest runs for one ComfyUI: the whole suite or (subset) the compat tests, or the given test
    paths as one run."""
    selection = ["-m", COMPAT_MARK] if subset else []
    if selects_tests(arguments):
        return [Run(version, [*selection, *arguments], "selected tests", cost=1.0)]
    seconds = durations()
    # The compat subset's seconds are recorded under "compat:<file>"; a file without one counts a quarter.
    cost = (lambda file: seconds.get(f"{COMPAT_MARK}:{file}", 0.25 * seconds.get(file, UNKNOWN_FILE_SECONDS))) \
        if subset else (lambda file: seconds.get(file, UNKNOWN_FILE_SECONDS))
    planned = [Run(version, [*selection, *arguments, tier], "server tiers",
                   cost=sum(cost(file) for file in server_files(tier, seconds)))
               for tier in SERVER_TIERS]
    files = in_process_files()
    if subset:   # the compat subset is a few files' worth: one run
        planned.append(Run(version, [*selection, *arguments, *files], "in-process tier",
                           cost=sum(cost(file) for file in files)))
    else:
        planned += [Run(version, [*arguments, *group], "in-process tier", cost=total)
                    for group, total in shards(files, seconds)]
    return planned


def server_files(tier: str, seconds: dict[str, float]) -> list[str]:
    return [file for file in seconds if file.startswith(tier + "/")]


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
    """Every pytest run of this invocation."""
    if fast:
        version = None if os.environ.get("COMFYUI_DIR") else os.environ.get("LORA_LAB_COMFYUI") or DEFAULT_COMFYUI
        return [Run(version, [*run, *arguments], "fast", cost=float(len(FAST_RUNS) - index))
                for index, run in enumerate(FAST_RUNS)]
    if os.environ.get("COMFYUI_DIR"):
        return runs_for(None, arguments, subset=False)
    usable, left_out = usable_comfyuis()
    full = FULL_COMFYUI if FULL_COMFYUI in usable else usable[0] if usable else None
    for version, why in left_out.items():   # one line each; the full suite's fallback is said in the same line
        instead = f"; ComfyUI {full} runs the whole suite instead" if version == FULL_COMFYUI and full else ""
        print(f"ComfyUI {version} {why}{instead}", flush=True)
    ordered = [full, *(version for version in usable if version != full)] if full else []
    return [run for version in ordered for run in runs_for(version, arguments, subset=version != full)]


def jobs_default() -> int:
    """How many runs go side by side: LORA_LAB_TEST_JOBS, else the cores, at most one per 8 GiB of memory."""
    if os.environ.get("LORA_LAB_TEST_JOBS"):
        return max(1, int(os.environ["LORA_LAB_TEST_JOBS"]))
    memory = memory_total()
    cores = os.cpu_count() or 1
    return max(1, min(cores, memory // (8 * GIB) if memory else cores))


def meminfo() -> dict[str, int]:
    try:
        with open("/proc/meminfo") as handle:
            return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle}
    except OSError:
        return {}


def memory_total() -> int:
    return meminfo().get("MemTotal", 0)


class MemoryWatch:
    """The machine's memory in use (MemTotal - MemAvailable), sampled every second; its peak."""

    def __init__(self) -> None:
        self.peak = self.start = self.sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def sample() -> int:
        info = meminfo()
        return info.get("MemTotal", 0) - info.get("MemAvailable", 0)

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            self.peak = max(self.peak, self.sample())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def environment_for(version: str | None, threads: int | None = None) -> dict[str, str]:
    environment = dict(os.environ)
    if version is not None:
        environment["LORA_LAB_COMFYUI"] = version
    if threads is not None:
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            environment[variable] = str(threads)
        environment.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    return environment


def pytest_command(arguments: list[str], junit: Path) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "scripts" / "setup_env.py"), "run", "--", "-m", "pytest", "-q", "-rs",
            "--durations=10", f"--junitxml={junit}", *arguments]   # the slowest tests, for keeping the suite short


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


def file_seconds(junit: Path) -> dict[str, float]:
    """Seconds per test file in a junit file (its test cases' times, set-up included)."""
    seconds: dict[str, float] = {}
    if not junit.is_file():
        return seconds
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")
        while parts and parts[-1][:1].isupper():   # a test class, not the module
            parts.pop()
        file = "/".join(parts) + ".py"
        seconds[file] = seconds.get(file, 0.0) + float(case.get("time", 0))
    return seconds


class Pool:
    """Runs set-ups and pytest runs side by side, `jobs` at once, the costliest ready one first; a ComfyUI's
    pytest runs wait for its set-up."""

    def __init__(self, jobs: int, folder: Path) -> None:
        self.jobs = jobs
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.folder = folder
        self.set_up: dict[str | None, int | str] = {}      # version -> "waiting", then the exit code
        self.lines: list[str] = []
        self.tiers: dict[str, float] = {}                   # tier -> wall seconds of its runs

    def execute(self, runs: list[Run], versions: list[str | None]) -> None:
        pending: list[tuple[str, object]] = [("set-up", version) for version in versions]
        pending += [("pytest", run) for run in sorted(runs, key=lambda run: -run.cost)]
        running: dict[subprocess.Popen, tuple[str, object, float, Path]] = {}
        try:
            self._loop(pending, running)
        finally:   # interrupted (Ctrl-C, a CI cancel): no run is left behind, nor what it started
            for process in running:
                with contextlib.suppress(ProcessLookupError):
                    if hasattr(os, "killpg"):
                        os.killpg(process.pid, signal.SIGTERM)   # its own session: the whole group
                    else:
                        process.terminate()
            for process in running:
                process.wait()

    def _loop(self, pending: list, running: dict) -> None:
        index = 0
        while pending or running:
            while len(running) < self.jobs:
                ready = next((item for item in pending if item[0] == "set-up"
                              or self.set_up.get(item[1].version, "waiting") != "waiting"), None)
                if ready is None:
                    break
                pending.remove(ready)
                kind, what = ready
                if kind == "pytest" and self.set_up[what.version]:
                    what.result = {"passed": 0, "failed": 1, "skipped": 0, "seconds": 0.0, "code": "not run: set-up failed"}
                    self.report(what)
                    continue
                index += 1
                log = self.folder / f"run{index}.log"
                if kind == "set-up":
                    self.set_up[what] = "waiting"
                    command = [sys.executable, str(REPO_ROOT / "scripts" / "setup_env.py")]
                    environment = environment_for(what)
                    print(f"----- started: set-up of {name(what)}", flush=True)
                else:
                    what.junit = self.folder / f"run{index}.xml"
                    command = pytest_command(what.arguments, what.junit)
                    environment = environment_for(what.version, self.threads)
                    print(f"----- started: pytest on {name(what.version)}: {what.label}", flush=True)
                with open(log, "w") as handle:
                    process = subprocess.Popen(command, env=environment, cwd=REPO_ROOT, stdout=handle,
                                               stderr=subprocess.STDOUT, start_new_session=True)
                running[process] = (kind, what, time.monotonic(), log)
            time.sleep(0.5)
            for process in [process for process in running if process.poll() is not None]:
                kind, what, begun, log = running.pop(process)
                seconds = time.monotonic() - begun
                output = log.read_text(errors="replace")
                if kind == "set-up":
                    self.set_up[what] = process.returncode
                    line = f"set-up of {name(what)}: {seconds:.0f} s" + (
                        f" (failed: exit {process.returncode})" if process.returncode else "")
                    print(f"\n===== set-up of {name(what)} =====\n{output}{line}", flush=True)
                    self.lines.append(line)
                    self.tier_seconds(f"set-up of {name(what)}", seconds)
                else:
                    what.result = {**counts(what.junit), "seconds": seconds, "code": process.returncode}
                    print(f"\n===== pytest on {name(what.version)}: {' '.join(what.arguments)} =====\n{output}",
                          flush=True)
                    self.report(what)

    def report(self, run: Run) -> None:
        found = run.result
        line = (f"{name(run.version)} ({run.label}): {found['passed']} passed, {found['failed']} failed, "
                f"{found['skipped']} skipped in {found['seconds']:.0f} s (pytest exit {found['code']})")
        print(line, flush=True)
        self.lines.append(line)
        self.tier_seconds(f"{name(run.version)}, {run.tier}", found["seconds"])

    def tier_seconds(self, tier: str, seconds: float) -> None:
        self.tiers[tier] = self.tiers.get(tier, 0.0) + seconds


def record_durations(runs: list[Run]) -> None:
    """tests/durations.json from this invocation's runs: seconds per file (the compat subset's under
    "compat:<file>")."""
    seconds = durations()
    for run in runs:
        if run.junit is not None:
            prefix = f"{COMPAT_MARK}:" if COMPAT_MARK in run.arguments else ""
            seconds.update({prefix + file: round(value, 1) for file, value in file_seconds(run.junit).items()})
    DURATIONS.write_text(json.dumps(dict(sorted(seconds.items())), indent=1) + "\n")
    print(f"wrote {DURATIONS.relative_to(REPO_ROOT)} ({len(seconds)} entries)", flush=True)


def main(argv: list[str]) -> int:
    started = time.monotonic()
    options = {"--plan", "--fast", "--record-durations"}
    arguments = [argument for argument in argv if argument not in options]
    planned = plan(arguments, fast="--fast" in argv)
    versions = list(dict.fromkeys(run.version for run in planned))
    for run in planned:
        run.label = " ".join(argument for argument in run.arguments if argument not in arguments) or "all tests"
        if len(run.label) > 160:
            run.label = f"{run.tier}: {run.label[:150]}..."
    jobs = jobs_default()
    if "--plan" in argv:
        print(f"{jobs} at once, {max(1, (os.cpu_count() or 1) // jobs)} thread(s) each")
        for run in planned:
            print(f"{name(run.version)}: pytest {' '.join(run.arguments)}  (~{run.cost:.0f} s)")
        return 0
    print(f"{len(planned)} pytest runs and {len(versions)} set-up(s), {jobs} at once", flush=True)
    with tempfile.TemporaryDirectory(prefix="lora-lab-runs-") as folder, MemoryWatch() as memory:
        pool = Pool(jobs, Path(folder))
        pool.execute(planned, versions)
        if "--record-durations" in argv:
            record_durations(planned)
    totals = {key: sum(run.result.get(key, 0) for run in planned) for key in ("passed", "failed", "skipped")}
    status = int(any(run.result.get("code") not in (0, 5) for run in planned)
                 or any(code for code in pool.set_up.values()))   # pytest's 5: the selection matched no test
    print("\n===== summary =====", flush=True)
    print("\n".join(pool.lines), flush=True)
    print("time per tier (the wall seconds of its runs, which went side by side): "
          + "; ".join(f"{tier} {seconds:.0f} s" for tier, seconds in pool.tiers.items()), flush=True)
    if memory.peak:
        print(f"memory in use on this machine: peak {memory.peak / GIB:.1f} GiB "
              f"({memory.start / GIB:.1f} GiB before the runs)", flush=True)
    print(f"time: total {time.monotonic() - started:.0f} s ({jobs} runs at once)", flush=True)
    print(f"matrix: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
