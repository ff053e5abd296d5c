#!/usr/bin/env python3
"""Run the benchmark steps under native python3 and under `stepbox run`, side by side, as ratios.

    python3 benches/compare_native.py [--stepbox target/release/stepbox] [--runs 7] [--data]

For each step it reports medians of:
  - process wall time: `python3 step.py` vs `stepbox run step.py` (includes process start and, for
    stepbox, loading the cached compiled runtime),
  - guest time: stepbox's own `usage.wall_time_us` (instantiate + run inside one process),
  - in-step time: the `elapsed=` the step prints itself, i.e. the same code region timed natively
    and in the sandbox (the fair CPU comparison).
Both sides run in this one invocation on this machine, so the ratios are comparable even when the
absolute numbers move with load.

`--data` adds the pandas step on the `python-data` runtime, against native pandas of the same
version (the venv guest-runtime/python-data/native-env.sh makes). `STEPBOX_ISOLATION=in-process`
measures in-process runs instead of sandbox workers.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = ["hello.py", "cpu_heavy.py", "files_heavy.py"]


def elapsed(stderr):
    m = re.search(r"elapsed=([0-9.]+)", stderr)
    return float(m.group(1)) if m else None


def native(step, python=sys.executable):
    t0 = time.perf_counter()
    p = subprocess.run([python, step], capture_output=True, text=True, check=True)
    return time.perf_counter() - t0, None, elapsed(p.stderr), p.stdout


def sandboxed(stepbox, step, env, runtime="python"):
    t0 = time.perf_counter()
    p = subprocess.run([stepbox, "run", "--runtime", runtime, "--json", step], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    r = json.loads(p.stdout)
    if r["status"] != "SUCCEEDED":
        sys.exit(f"{step}: {r['status']}: {r['message']}\n{r['stderr']}")
    return wall, r["usage"]["wall_time_us"] / 1e6, elapsed(r["stderr"]), r["stdout"]


def ms(x):
    return "-" if x is None else f"{x * 1000:9.1f}"


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:6.2f}x"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stepbox", default=os.path.join(ROOT, "target/release/stepbox"))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--data", action="store_true", help="also the pandas step on python-data")
    args = ap.parse_args()
    env = dict(os.environ)
    env.setdefault("STEPBOX_CACHE_DIR", os.path.join(ROOT, "target/bench-cache"))
    env.setdefault("STEPBOX_PYTHON_COMPONENT", os.path.join(ROOT, "target/guest/python-runtime.wasm"))
    print(f"python3 {sys.version.split()[0]} vs stepbox ({args.stepbox}), median of {args.runs} runs each, ms")
    # Warm the artifact cache so no run pays for compiling the runtime.
    sandboxed(args.stepbox, os.path.join(HERE, "steps", "hello.py"), env)
    head = f"{'step':<14}{'native proc':>12}{'stepbox proc':>13}{'ratio':>8}{'guest':>10}{'native in-step':>15}{'sandbox in-step':>16}{'ratio':>8}"
    print(head)
    steps = [(name, sys.executable, "python") for name in STEPS]
    if args.data:
        venv = subprocess.run(["bash", os.path.join(ROOT, "guest-runtime/python-data/native-env.sh")],
                              capture_output=True, text=True, check=True).stdout.strip()
        steps.append(("pandas_heavy.py", venv, "python-data"))
        # Warm the python-data artifact too (minutes on a cold cache).
        sandboxed(args.stepbox, os.path.join(HERE, "steps", "hello.py"), env, "python-data")
    for name, python, runtime in steps:
        step = os.path.join(HERE, "steps", name)
        n, s = [], []
        for _ in range(args.runs):  # interleaved, so drifting load hits both sides alike
            n.append(native(step, python))
            s.append(sandboxed(args.stepbox, step, env, runtime))
        if n[0][3] != s[0][3]:
            sys.exit(f"{name}: stdout differs: native {n[0][3]!r} vs sandbox {s[0][3]!r}")
        med = lambda rows, i: None if rows[0][i] is None else statistics.median(r[i] for r in rows)
        np_, sp = med(n, 0), med(s, 0)
        ni, si = med(n, 2), med(s, 2)
        print(f"{name:<14}{ms(np_):>12}{ms(sp):>13}{ratio(sp, np_):>8}{ms(med(s, 1)):>10}{ms(ni):>15}{ms(si):>16}{ratio(si, ni):>8}")


if __name__ == "__main__":
    main()
