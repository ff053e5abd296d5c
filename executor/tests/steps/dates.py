"""Parse dates in mixed formats, normalise to ISO 8601, and report weekdays, ISO weeks and gaps."""
import calendar
import datetime as dt
import sys

indir, outdir = sys.argv[1], sys.argv[2]
FORMATS = ["%Y-%m-%d", "%d/%m/%Y", "%b %d, %Y", "%d.%m.%y", "%Y-%m-%dT%H:%M:%S%z", "%A %d %B %Y"]

def parse(text):
    for fmt in FORMATS:
        try:
            return dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None

out = []
prev = None
for raw in open(f"{indir}/dates.txt", encoding="utf-8").read().splitlines():
    d = parse(raw.strip())
    if d is None:
        out.append(f"{raw!r}: unparseable")
        continue
    utc = d.astimezone(dt.timezone.utc).replace(tzinfo=None) if d.tzinfo else d
    gap = "" if prev is None else f" (+{(utc - prev).days}d)"
    prev = utc
    y, w, _ = utc.isocalendar()
    out.append(f"{raw!r}: {utc.isoformat()} {calendar.day_name[utc.weekday()]} W{w:02d}/{y}{gap}")
open(f"{outdir}/dates.out", "w", encoding="utf-8").write("\n".join(out) + "\n")
print("\n".join(out))
print(calendar.month(2024, 2))
