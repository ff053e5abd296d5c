"""Per-call cost of common host calls from Python, in microseconds, one line each on stderr.

In the sandbox each of these is a WASI host call (clock, fd_fdstat_get, path_filestat_get,
path_open + fd_close, fd_readdir, fd_write); natively a system call or vDSO read. Run it natively
and with `stepbox run` (either runtime) and compare the lines:

    python3 benches/steps/host_calls.py
    target/release/stepbox run benches/steps/host_calls.py
    target/release/stepbox run --runtime python-data benches/steps/host_calls.py
"""
import os
import sys
import tempfile
import time

d = tempfile.mkdtemp()
f = os.path.join(d, "f.txt")
with open(f, "w") as fh:
    fh.write("x")
for i in range(20):
    open(os.path.join(d, f"g{i}"), "w").close()
big = os.path.join(d, "big")
os.mkdir(big)
for i in range(4000):
    open(os.path.join(big, f"entry-{i:05d}"), "w").close()
missing = os.path.join(d, "missing")
devnull = open(os.path.join(d, "sink"), "w")


def per_call(fn, n):
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def write_flush():
    devnull.write("x")
    devnull.flush()


cases = [
    ("time.time()", time.time, 200_000),
    ("time.perf_counter()", time.perf_counter, 200_000),
    ("os.getpid()", os.getpid, 200_000),
    ("sys.stderr.isatty()", sys.stderr.isatty, 50_000),
    ("os.stat(file)", lambda: os.stat(f), 20_000),
    ("os.path.exists(missing)", lambda: os.path.exists(missing), 20_000),
    ("open+read+close", lambda: open(f).read(), 10_000),
    ("os.listdir(22 entries)", lambda: os.listdir(d), 5_000),
    ("os.listdir(4000 entries)", lambda: os.listdir(big), 20),
    ("write+flush 1 byte", write_flush, 20_000),
]
print(len(cases))
for name, fn, n in cases:
    print(f"{name:<26}{per_call(fn, n):8.2f} us", file=sys.stderr)
