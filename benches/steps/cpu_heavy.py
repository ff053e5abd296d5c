"""CPU-heavy data step: build a 200k-row CSV, parse it, aggregate by region and month, dump JSON.

Prints its result on stdout and its own compute time on stderr (`elapsed=SECONDS`), so the same
region of code is timed natively and in the sandbox.
"""
import csv
import hashlib
import io
import json
import sys
import time

t0 = time.perf_counter()
buf = io.StringIO()
w = csv.writer(buf)
w.writerow(["id", "region", "amount", "date"])
regions = ["north", "south", "east", "west"]
for i in range(200_000):
    w.writerow([i, regions[i % 4], f"{(i * 7919) % 10000 / 100:.2f}", f"2024-{i % 12 + 1:02d}-{i % 28 + 1:02d}"])
buf.seek(0)
totals = {}
for row in csv.DictReader(buf):
    key = (row["region"], row["date"][:7])
    totals[key] = totals.get(key, 0.0) + float(row["amount"])
out = json.dumps(sorted((f"{k[0]}/{k[1]}", round(v, 2)) for k, v in totals.items()))
print(len(totals), hashlib.sha256(out.encode()).hexdigest())
print(f"elapsed={time.perf_counter() - t0:.6f}", file=sys.stderr)
