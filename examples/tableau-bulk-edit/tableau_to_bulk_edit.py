"""Turns a Tableau crosstab export into the bulk-edit CSV the validator reads.

Tableau's "Download > Crosstab" writes UTF-16 with a byte-order mark, tab-separated, with
display formatting: US dates (3/1/2025) and thousands separators (10,001). This step decodes it,
renames the columns, writes ISO dates and plain integers, and leaves everything else exactly as
exported (stray spaces included): judging values is the validator's job, not this step's.
"""

import csv
import io
import sys

COLUMNS = {
    "Account Id": "account_id",
    "Email": "email",
    "Plan": "plan",
    "Seats": "seats",
    "Renewal Date": "renewal_date",
}

raw = open("/input/accounts_crosstab.csv", "rb").read()
try:
    text = raw.decode("utf-16")  # the BOM gives the byte order
except UnicodeDecodeError as e:
    sys.exit(f"accounts_crosstab.csv is not UTF-16 text as Tableau exports it: {e}")
rows = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t"))
if not rows:
    sys.exit("accounts_crosstab.csv is empty")
header = [h.strip() for h in rows[0]]
missing = [c for c in COLUMNS if c not in header]
if missing:
    sys.exit(f"the export lacks {', '.join(missing)}; it has {', '.join(header)}")
at = {name: header.index(col) for col, name in COLUMNS.items()}


def iso_date(v):
    parts = v.split("/")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return v
    m, d, y = parts
    return f"{y}-{int(m):02}-{int(d):02}"


def integer(v):
    plain = v.replace(",", "")
    return plain if plain.isdigit() else v


converted = 0
with open("/output/bulk_edit.csv", "w", newline="") as f:
    out = csv.writer(f, lineterminator="\n")
    out.writerow(COLUMNS.values())
    for row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue
        rec = {name: row[i] if i < len(row) else "" for name, i in at.items()}
        rec["seats"] = integer(rec["seats"])
        rec["renewal_date"] = iso_date(rec["renewal_date"])
        out.writerow(rec.values())
        converted += 1
print(f"{converted} rows converted")
