"""Validate a bulk-edit CSV: emails, plans, seat counts, renewal dates, duplicate ids."""
import csv
import datetime
import re
import sys
from collections import Counter

# Where the CSV is and where the report goes: argv[1] and argv[2], by default the sandbox's
# /input and /output (so a published step needs no arguments).
indir = sys.argv[1] if len(sys.argv) > 1 else "/input"
outdir = sys.argv[2] if len(sys.argv) > 2 else "/output"
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")
PLANS = {"free", "team", "business", "enterprise"}

with open(f"{indir}/bulk_edit.csv", newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))

ids = Counter(r["account_id"] for r in rows)
problems = []
for line, row in enumerate(rows, start=2):
    if not EMAIL.match(row["email"]):
        problems.append((line, "email", row["email"], "not a valid address"))
    if row["plan"] not in PLANS:
        hint = f"did you mean {row['plan'].lower()!r}?" if row["plan"].lower() in PLANS else "unknown plan"
        problems.append((line, "plan", row["plan"], hint))
    try:
        seats = int(row["seats"])
        if not 1 <= seats <= 1000:
            problems.append((line, "seats", row["seats"], "out of range 1-1000"))
    except ValueError:
        problems.append((line, "seats", row["seats"], "not an integer"))
    try:
        datetime.datetime.strptime(row["renewal_date"], "%Y-%m-%d")
    except ValueError as e:
        problems.append((line, "renewal_date", row["renewal_date"], str(e)))
    if ids[row["account_id"]] > 1:
        problems.append((line, "account_id", row["account_id"], "duplicate id"))

with open(f"{outdir}/bulk_edit_errors.csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["line", "column", "value", "problem"])
    w.writerows(problems)
print(f"{len(rows)} rows checked, {len(problems)} problems")
for p in problems:
    print(*p, sep=" | ")
