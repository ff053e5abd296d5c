"""Flatten nested JSON records into dotted keys; write JSON Lines and a CSV with the union of keys."""
import csv
import json
import sys

indir, outdir = sys.argv[1], sys.argv[2]

def flatten(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from flatten(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], value

with open(f"{indir}/orders.json", encoding="utf-8") as f:
    records = json.load(f)
flat = [dict(flatten(r)) for r in records]
keys = sorted({k for r in flat for k in r})
with open(f"{outdir}/orders.jsonl", "w", encoding="utf-8") as f:
    for r in flat:
        f.write(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n")
with open(f"{outdir}/orders.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(flat)
total = sum(r.get("total", 0) for r in records)
print(json.dumps({"records": len(flat), "columns": len(keys), "total": round(total, 2)}, indent=2))
