#!/usr/bin/env python3
"""Run pyperformance's stdlib-only benchmarks under native python3 and as Stepbox steps, side by side.

    python3 benches/pyperformance.py [--stepbox target/release/stepbox] [--runs 3] [--only NAME,...]
                                     [--json FILE] [--python python3] [--variants] [--target 0.3]
                                     [--recalibrate]

The benchmarks come from PyPI's `pyperformance` package, pinned (version and wheel sha256 below),
downloaded once with `pip download` into target/pyperformance/ and unpacked there. A benchmark is
taken when its pyproject.toml depends on nothing but pyperf, it has no requirements.txt and it
imports only the standard library, pyperf and modules of its own directory; the rest are listed as
skipped with the reason. Benchmarks that cannot work in a WASI sandbox by construction (they time
subprocesses, sockets or worker processes) are listed as "not applicable"; every other failure in
the sandbox is a row of the table with its status, and its stderr is shown below the table.

`pyperf` is replaced by benches/pyperf_standin.py: each benchmark becomes ONE self-contained step
file (target/pyperformance/steps/step_<name>.py) holding the stand-in, the benchmark's run_benchmark.py
and, base64-encoded, the other files of its directory (helper modules, data files), written to a
temporary directory when the step starts. The same file runs as `python3 step.py` and as
`stepbox run --json step.py` under the default policy (no --policy, no --limit). The stand-in runs
one warmup (left out when one loop already takes the target) and then one timed call with a fixed
loop count; the loop counts are calibrated once
natively (about --target seconds of timed work per bench name) and kept in
target/pyperformance/loops-python<version>.json, so both sides, and later invocations, run the
same work.

The ratio is sandbox/native of the time the benchmark itself times (pyperf's timed region, summed
over the bench names a file registers), not process time; with --runs N each side is the median of
N runs, native and sandbox interleaved so drifting load hits both alike. Note the two interpreters
differ: native is this python3 (or --python), the sandbox runs the guest runtime's CPython (3.14,
WASI); pass e.g. a native CPython 3.13 with --python to take most of the version gap out.

Issue 14's target: every benchmark completes under the default policy, geometric mean <= 1.5x,
none worse than 3x. This script reports; it always exits 0 once it has run.

Environment for stepbox, as in benches/compare_native.py: STEPBOX_CACHE_DIR defaults to
target/bench-cache and STEPBOX_PYTHON_COMPONENT to target/guest/python-runtime.wasm.
"""
import argparse
import ast
import base64
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import zipfile

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(ROOT, "target", "pyperformance")

PYPERFORMANCE_VERSION = "1.14.0"
WHEEL = f"pyperformance-{PYPERFORMANCE_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "94068ac2935b6952ccb5e8a302eb9cebc26e82454494bef6e53822738adf0049"

# Structurally impossible in a WASI sandbox (or anywhere without the thing they time), keyed by the
# benchmark directory without `bm_`. Anything else that fails in the sandbox is reported as failed.
NOT_APPLICABLE = {
    "2to3": "times the 2to3 program run as a subprocess (bench_command); lib2to3 was also removed in Python 3.13",
    "python_startup": "times starting a python subprocess (bench_command)",
    "asyncio_tcp": "TCP client and server over sockets (and ssl) in one process",
    "concurrent_imap": "multiprocessing.Pool and ThreadPool: worker processes and threads",
}
MAX_EMBED_BYTES = 2 << 20  # a benchmark's own files larger than this in total are not inlined

RESULT_RE = re.compile(r"^PYPERF_RESULT name=(\S+) seconds=(\S+) loops=(\d+)", re.M)
SANDBOX_OK = "SUCCEEDED"


# --- fetching ---------------------------------------------------------------------------------

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch():
    """The unpacked wheel's data-files/benchmarks directory (downloaded and verified once)."""
    os.makedirs(WORK, exist_ok=True)
    wheel = os.path.join(WORK, WHEEL)
    if not os.path.exists(wheel):
        print(f"downloading pyperformance=={PYPERFORMANCE_VERSION} from PyPI into {WORK}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                        f"pyperformance=={PYPERFORMANCE_VERSION}", "--no-deps", "--only-binary", ":all:",
                        "-d", WORK], check=True, stdout=subprocess.DEVNULL)
    got = sha256(wheel)
    if got != WHEEL_SHA256:
        sys.exit(f"{wheel}: sha256 {got}, expected {WHEEL_SHA256}; delete it to download again")
    unpacked = os.path.join(WORK, f"pyperformance-{PYPERFORMANCE_VERSION}")
    stamp = os.path.join(unpacked, ".sha256")
    if not (os.path.exists(stamp) and open(stamp).read() == got):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(unpacked)
        with open(stamp, "w") as f:
            f.write(got)
    return os.path.join(unpacked, "pyperformance", "data-files", "benchmarks")


# --- discovery --------------------------------------------------------------------------------

def load_toml(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


def imported_modules(source):
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def own_files(bdir):
    """The benchmark directory's files other than its metadata and run_benchmark.py: rel -> bytes."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(bdir):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), bdir)
            if rel in ("run_benchmark.py", "pyproject.toml", "requirements.txt") or (
                    os.sep not in rel and fn.endswith(".toml")):
                continue
            with open(os.path.join(dirpath, fn), "rb") as f:
                files[rel] = f.read()
    return files


def discover(bench_root, variants):
    """(benchmarks, skipped, not_applicable): benchmarks are dicts; the others (name, reason)."""
    stdlib = set(sys.stdlib_module_names) | {"pyperf", "__future__"}
    benches, skipped, na = [], [], []
    for d in sorted(os.listdir(bench_root)):
        bdir = os.path.join(bench_root, d)
        if not (d.startswith("bm_") and os.path.isfile(os.path.join(bdir, "pyproject.toml"))):
            continue
        short = d[3:]
        meta = load_toml(os.path.join(bdir, "pyproject.toml"))
        deps = [x for x in meta.get("project", {}).get("dependencies", []) if x != "pyperf"]
        if deps:
            skipped.append((short, "depends on " + ", ".join(deps)))
            continue
        req = os.path.join(bdir, "requirements.txt")
        if os.path.exists(req):
            reqs = [ln.strip() for ln in open(req) if ln.strip() and not ln.startswith("#")]
            skipped.append((short, "requirements.txt: " + ", ".join(reqs)))
            continue
        source = open(os.path.join(bdir, "run_benchmark.py")).read()
        if short in NOT_APPLICABLE or "bench_command" in source:
            na.append((short, NOT_APPLICABLE.get(short, "bench_command: times a subprocess")))
            continue
        files = own_files(bdir)
        helpers = [r for r in files if r.endswith(".py") and os.sep not in r]  # not data/**/*.py
        local = {r[:-3] for r in helpers}
        mods = imported_modules(source)
        for rel in helpers:
            mods |= imported_modules(files[rel].decode())
        foreign = sorted(mods - stdlib - local)
        if foreign:
            skipped.append((short, "imports " + ", ".join(foreign)))
            continue
        size = sum(len(b) for b in files.values())
        if size > MAX_EMBED_BYTES:
            skipped.append((short, f"its own files are {size} bytes, more than is inlined into a step"))
            continue
        configs = [meta]
        if variants:
            configs += [load_toml(os.path.join(bdir, fn)) for fn in sorted(os.listdir(bdir))
                        if fn.endswith(".toml") and fn != "pyproject.toml"]
        for conf in configs:
            tool = conf.get("tool", {}).get("pyperformance", {})
            benches.append({
                "name": tool.get("name", short),
                "dir": d,
                "extra_opts": list(tool.get("extra_opts", [])),
                "source": source,
                "files": files,
            })
    return benches, skipped, na


# --- steps ------------------------------------------------------------------------------------

STEP_TEMPLATE = '''\
# Generated by benches/pyperformance.py from pyperformance {version} {dir}/run_benchmark.py
# (benchmark {name}, arguments {extra_opts!r}); regenerated on every run, do not edit.
import sys as _sys
import types as _types

_PYPERF_SOURCE = {pyperf_source!r}
_pyperf = _types.ModuleType("pyperf")
exec(compile(_PYPERF_SOURCE, "pyperf_standin.py", "exec"), _pyperf.__dict__)
_sys.modules["pyperf"] = _pyperf
_pyperf.LOOPS = {loops!r}
_pyperf.CALIBRATE = {calibrate!r}

# The benchmark's own files (helper modules, data), base64.
_FILES = {files!r}
if _FILES:
    import atexit as _atexit
    import base64 as _base64
    import os as _os
    import shutil as _shutil
    import tempfile as _tempfile
    _dir = _tempfile.mkdtemp(prefix="{dir}_")
    _atexit.register(_shutil.rmtree, _dir, True)
    for _rel, _data in _FILES.items():
        _path = _os.path.join(_dir, _rel)
        _os.makedirs(_os.path.dirname(_path), exist_ok=True)
        with open(_path, "wb") as _f:
            _f.write(_base64.b64decode(_data))
    _sys.path.insert(0, _dir)
    __file__ = _os.path.join(_dir, "run_benchmark.py")
_sys.argv = ["run_benchmark.py"] + {extra_opts!r}

_SOURCE = {source!r}
exec(compile(_SOURCE, "{dir}/run_benchmark.py", "exec"), globals())
'''


def write_step(bench, loops, calibrate):
    os.makedirs(os.path.join(WORK, "steps"), exist_ok=True)
    # Not named like the benchmark: the step's directory is sys.path[0], and pickle.py or logging.py
    # there would shadow the standard library.
    suffix = ".calibrate.py" if calibrate else ".py"
    path = os.path.join(WORK, "steps", "step_" + bench["name"] + suffix)
    with open(os.path.join(HERE, "pyperf_standin.py")) as f:
        standin = f.read()
    text = STEP_TEMPLATE.format(
        version=PYPERFORMANCE_VERSION, dir=bench["dir"], name=bench["name"],
        extra_opts=bench["extra_opts"], pyperf_source=standin, loops=loops, calibrate=calibrate,
        files={rel: base64.b64encode(b).decode() for rel, b in bench["files"].items()},
        source=bench["source"])
    with open(path, "w") as f:
        f.write(text)
    return path


# --- running ----------------------------------------------------------------------------------

def parse_results(stdout):
    return [(m.group(1), float(m.group(2)), int(m.group(3))) for m in RESULT_RE.finditer(stdout)]


def tail(text, n=8):
    lines = [ln for ln in (text or "").rstrip().splitlines()]
    return "\n".join(lines[-n:])


def native(python, step, timeout):
    t0 = time.perf_counter()
    try:
        p = subprocess.run([python, step], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "status": f"timed out after {timeout} s", "stderr": e.stderr or "",
                "results": [], "wall": time.perf_counter() - t0}
    results = parse_results(p.stdout)
    ok = p.returncode == 0 and bool(results)
    status = "ok" if ok else (f"exit code {p.returncode}" if p.returncode else "no PYPERF_RESULT line")
    return {"ok": ok, "status": status, "stderr": p.stderr, "results": results,
            "wall": time.perf_counter() - t0}


def sandboxed(stepbox, step, env, timeout):
    t0 = time.perf_counter()
    try:
        p = subprocess.run([stepbox, "run", "--json", step], capture_output=True, text=True,
                           env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "status": "HARNESS_TIMEOUT", "message": f"stepbox did not return in {timeout} s",
                "stderr": e.stderr or "", "results": [], "wall": time.perf_counter() - t0, "guest": None}
    wall = time.perf_counter() - t0
    try:
        r = json.loads(p.stdout)
    except ValueError:
        return {"ok": False, "status": "NO_JSON", "message": f"stepbox exited {p.returncode} without a JSON result",
                "stderr": p.stderr, "results": [], "wall": wall, "guest": None}
    results = parse_results(r.get("stdout") or "")
    status = r.get("status")
    message = r.get("message") or ""
    if status == SANDBOX_OK and not results:
        message = "no PYPERF_RESULT line on stdout"
    usage = r.get("usage") or {}
    guest = usage.get("wall_time_us")
    return {"ok": status == SANDBOX_OK and bool(results), "status": status, "message": message,
            "stderr": r.get("stderr") or "", "results": results, "wall": wall,
            "guest": None if guest is None else guest / 1e6,
            "peak_memory_bytes": usage.get("peak_memory_bytes")}


def timed(run):
    return sum(s for _, s, _ in run["results"])


def load_loops(target, python_version):
    path = os.path.join(WORK, f"loops-python{python_version}.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {}
    key = {"python": python_version, "target": target, "pyperformance": PYPERFORMANCE_VERSION}
    if any(data.get(k) != v for k, v in key.items()):
        data = dict(key, loops={})
    return path, data


def calibrate(python, bench, target, timeout):
    """name -> loops from a native calibration run, or the failed run."""
    run = native(python, write_step(bench, {}, target), timeout)
    if not run["ok"]:
        return None, run
    return {name: loops for name, _, loops in run["results"]}, run


def sandbox_version(stepbox, env):
    """Run a trivial step (warming the compiled-runtime cache) and return the guest's Python version."""
    os.makedirs(os.path.join(WORK, "steps"), exist_ok=True)
    step = os.path.join(WORK, "steps", "_version.py")
    with open(step, "w") as f:
        f.write("import sys\nprint(sys.version.split()[0], sys.platform)\n")
    run = subprocess.run([stepbox, "run", "--json", step], capture_output=True, text=True, env=env)
    try:
        r = json.loads(run.stdout)
    except ValueError:
        sys.exit(f"{stepbox} run --json {step}: no JSON result (exit {run.returncode})\n{tail(run.stderr)}")
    if r["status"] != SANDBOX_OK:
        sys.exit(f"{stepbox} run {step}: {r['status']}: {r['message']}\n{tail(r['stderr'])}")
    return r["stdout"].strip()


# --- report -----------------------------------------------------------------------------------

def fmt_s(x):
    return "-" if x is None else f"{x:.3f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stepbox", default=os.path.join(ROOT, "target/release/stepbox"))
    ap.add_argument("--python", default=sys.executable,
                    help="the native interpreter (default: this one); e.g. a CPython 3.13 to be closer to the guest's")
    ap.add_argument("--runs", type=int, default=3, help="runs per side; the median is reported")
    ap.add_argument("--only", help="comma-separated benchmark names (or bm_ directory names without bm_)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--variants", action="store_true",
                    help="also run the variants a benchmark directory defines in extra .toml files "
                         "(argparse_subparsers, async_tree_io, pickle_pure_python, ...)")
    ap.add_argument("--target", type=float, default=0.3,
                    help="seconds of timed native work per bench name the loop counts are calibrated to")
    ap.add_argument("--recalibrate", action="store_true", help="ignore the saved loop counts (target/pyperformance/loops-python*.json)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before a run is abandoned")
    args = ap.parse_args()
    if tomllib is None:
        sys.exit("needs Python 3.11+ (tomllib)")
    started = time.perf_counter()

    env = dict(os.environ)
    env.setdefault("STEPBOX_CACHE_DIR", os.path.join(ROOT, "target/bench-cache"))
    env.setdefault("STEPBOX_PYTHON_COMPONENT", os.path.join(ROOT, "target/guest/python-runtime.wasm"))

    bench_root = fetch()
    benches, skipped, na = discover(bench_root, args.variants)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        known = {b["name"] for b in benches} | {b["dir"][3:] for b in benches}
        unknown = sorted(wanted - known)
        if unknown:
            print(f"--only: not among the runnable benchmarks: {', '.join(unknown)}")
        benches = [b for b in benches if b["name"] in wanted or b["dir"][3:] in wanted]

    guest = sandbox_version(args.stepbox, env)
    host = subprocess.run([args.python, "-c", "import sys; print(sys.version.split()[0])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    print(f"pyperformance {PYPERFORMANCE_VERSION} stdlib-only benchmarks: native python3 "
          f"{host} ({args.python}) vs stepbox ({args.stepbox}, default policy) "
          f"running CPython {guest}; timed seconds, median of {args.runs} run(s) each")
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    for name, reason in na:
        print(f"not applicable {name}: {reason}")
    print(flush=True)

    loops_path, loops_data = load_loops(args.target, host)
    rows = []
    print(f"{'benchmark':<28}{'native s':>10}{'sandbox s':>11}{'ratio':>9}  sandbox status", flush=True)
    for bench in benches:
        name = bench["name"]
        row = {"name": name, "dir": bench["dir"], "extra_opts": bench["extra_opts"],
               "native": None, "sandbox": None, "ratio": None}
        loops = None if args.recalibrate else loops_data["loops"].get(name)
        if loops is None:
            loops, cal = calibrate(args.python, bench, args.target, args.timeout)
            if loops is None:
                row.update(native_error=cal["status"], native_stderr=tail(cal["stderr"], 20))
                rows.append(row)
                print(f"{name:<28}{'-':>10}{'-':>11}{'-':>9}  (not run: FAILED natively: {cal['status']})", flush=True)
                continue
            loops_data["loops"][name] = loops
            with open(loops_path, "w") as f:
                json.dump(loops_data, f, indent=1, sort_keys=True)
        row["loops"] = loops
        step = write_step(bench, loops, None)
        n_runs, s_runs = [], []
        for _ in range(args.runs):  # interleaved, so drifting load hits both sides alike
            n = native(args.python, step, args.timeout)
            n_runs.append(n)
            if not n["ok"]:
                break
            s = sandboxed(args.stepbox, step, env, args.timeout)
            s_runs.append(s)
            if not s["ok"]:
                break
        bad_n = next((r for r in n_runs if not r["ok"]), None)
        bad_s = next((r for r in s_runs if not r["ok"]), None)
        if bad_n is None:
            row["native"] = statistics.median(timed(r) for r in n_runs)
            row["native_by_name"] = {k: s for k, s, _ in n_runs[-1]["results"]}
        else:
            row.update(native_error=bad_n["status"], native_stderr=tail(bad_n["stderr"], 20))
        if s_runs:
            last = bad_s or s_runs[-1]
            row.update(sandbox_status=last["status"], sandbox_message=last["message"],
                       guest_wall=statistics.median(r["guest"] for r in s_runs if r["guest"] is not None)
                       if any(r["guest"] is not None for r in s_runs) else None,
                       peak_memory_bytes=last.get("peak_memory_bytes"))
            if bad_s is None:
                row["sandbox"] = statistics.median(timed(r) for r in s_runs)
                row["sandbox_by_name"] = {k: s for k, s, _ in s_runs[-1]["results"]}
            else:
                row["sandbox_stderr"] = tail(bad_s["stderr"], 20)
                partial = bad_s["results"]
                if partial:
                    row["sandbox_partial"] = {k: s for k, s, _ in partial}
        if row["native"] and row["sandbox"] is not None:
            row["ratio"] = row["sandbox"] / row["native"]
        rows.append(row)
        if bad_n is not None:
            status = f"(not run: FAILED natively: {bad_n['status']})"
        elif bad_s is not None:
            status = f"{bad_s['status']}: {bad_s['message']}"
        else:
            status = row.get("sandbox_status", "-")
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        print(f"{name:<28}{fmt_s(row['native']):>10}{fmt_s(row['sandbox']):>11}{ratio:>9}  {status}", flush=True)

    done = [r for r in rows if r["ratio"] is not None]
    print()
    if done:
        geo = math.exp(sum(math.log(r["ratio"]) for r in done) / len(done))
        worst = max(done, key=lambda r: r["ratio"])
        best = min(done, key=lambda r: r["ratio"])
        over3 = [r for r in done if r["ratio"] > 3]
        print(f"geometric mean {geo:.2f}x over {len(done)} completed")
        print(f"worst {worst['ratio']:.2f}x {worst['name']}; best {best['ratio']:.2f}x {best['name']}")
        print(f"worse than 3x: {len(over3)}" + (f" ({', '.join(r['name'] for r in over3)})" if over3 else ""))
    else:
        geo = worst = None
        over3 = []
    failed_s = [r for r in rows if r.get("native_error") is None and r["sandbox"] is None]
    failed_n = [r for r in rows if r.get("native_error") is not None]
    print(f"completed {len(done)}/{len(rows)}; failed in the sandbox: {len(failed_s)}; "
          f"failed natively: {len(failed_n)}; skipped: {len(skipped)}; not applicable: {len(na)}")
    met = bool(rows) and len(done) == len(rows) and geo is not None and geo <= 1.5 and not over3
    subset = " on this --only subset" if args.only else ""
    print(f"issue 14 target (all complete, geometric mean <= 1.5x, none > 3x): {'met' if met else 'not met'}{subset}")
    for r in failed_s:
        print(f"\n{r['name']}: sandbox {r.get('sandbox_status')}: {r.get('sandbox_message')}")
        if r.get("sandbox_stderr"):
            print("  " + r["sandbox_stderr"].replace("\n", "\n  "))
    for r in failed_n:
        print(f"\n{r['name']}: FAILED natively: {r['native_error']}")
        if r.get("native_stderr"):
            print("  " + r["native_stderr"].replace("\n", "\n  "))
    elapsed = time.perf_counter() - started
    print(f"\ntook {elapsed:.0f} s")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pyperformance": PYPERFORMANCE_VERSION, "native_python": host, "native_executable": args.python,
                       "sandbox_python": guest, "stepbox": args.stepbox, "runs": args.runs,
                       "target_seconds": args.target, "geometric_mean": geo,
                       "worst": None if worst is None else {"name": worst["name"], "ratio": worst["ratio"]},
                       "over_3x": [r["name"] for r in over3], "target_met": met,
                       "skipped": [{"name": n, "reason": why} for n, why in skipped],
                       "not_applicable": [{"name": n, "reason": why} for n, why in na],
                       "benchmarks": rows, "elapsed_seconds": elapsed}, f, indent=1)


if __name__ == "__main__":
    main()
