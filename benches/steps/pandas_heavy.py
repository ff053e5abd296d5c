"""pandas data step (runtime python-data): a 1M-row frame, groupby, merge, string columns, pivot.

Prints its result on stdout and its own compute time on stderr (`elapsed=SECONDS`), so the same
region of code is timed natively (the reference venv of guest-runtime/python-data/native-env.sh)
and in the sandbox.
"""
import sys
import time

import numpy as np
import pandas as pd

t0 = time.perf_counter()
n = 1_000_000
idx = np.arange(n, dtype=np.int64)
df = pd.DataFrame({
    "id": idx,
    "region": np.array(["north", "south", "east", "west"])[idx % 4],
    "amount": (idx * 7919 % 10000) / 100.0,
    "day": idx % 365 + 1,
})
df["month"] = (df["day"] - 1) // 31 + 1
g = df.groupby(["region", "month"])["amount"].agg(["sum", "mean", "count"])
regions = pd.DataFrame({"region": ["north", "south", "east", "west"], "manager": ["a", "b", "c", "d"]})
m = df.merge(regions, on="region")
m["label"] = m["region"].str.upper() + "-" + m["month"].astype(str)
p = m.pivot_table(index="label", values="amount", aggfunc="sum")
csv = g.round(4).to_csv()
print(len(g), len(p), round(float(p["amount"].sum()), 2), len(csv))
print(f"elapsed={time.perf_counter() - t0:.6f}", file=sys.stderr)
