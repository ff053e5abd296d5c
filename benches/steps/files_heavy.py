"""File-system step: 2000 scratch files made, listed, stat-ed, globbed, read and removed.

What pyperformance's `pathlib` does; in the sandbox each call is a WASI host call. Prints its result
on stdout and its own compute time on stderr (`elapsed=SECONDS`).
"""
import os
import pathlib
import shutil
import sys
import tempfile
import time

t0 = time.perf_counter()
d = pathlib.Path(tempfile.mkdtemp())
for i in range(2000):
    (d / f"f{i}.{'py' if i % 2 else 'txt'}").write_text(str(i))
total = 0
for _ in range(5):
    for p in d.iterdir():
        total += p.stat().st_size
    total += len(list(d.glob("*.py")))
for p in sorted(d.iterdir())[:500]:
    total += len(p.read_text())
shutil.rmtree(d)
print(total)
print(f"elapsed={time.perf_counter() - t0:.6f}", file=sys.stderr)
