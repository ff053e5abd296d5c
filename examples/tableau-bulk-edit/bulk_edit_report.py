"""Writes the bulk-edit check as a short Markdown report for the account team."""

import csv

import tabulate

tabulate.PRESERVE_WHITESPACE = True  # a stray space is often the problem: show it

with open("/input/bulk_edit_errors.csv", newline="") as f:
    problems = list(csv.DictReader(f))
lines = sorted({int(p["line"]) for p in problems})
with open("/output/report.md", "w") as f:
    f.write("# Bulk edit check\n\n")
    if not problems:
        f.write("No problems found: the file can be applied.\n")
    else:
        f.write(f"{len(problems)} problems on {len(lines)} lines; fix them before applying.\n\n")
        table = [[p["line"], p["column"], f'"{p["value"]}"', p["problem"]] for p in problems]
        headers = ["line", "column", "value", "problem"]
        f.write(tabulate.tabulate(table, headers=headers, tablefmt="github"))
        f.write("\n")
print(f"{len(problems)} problems reported")
