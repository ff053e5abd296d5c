"""Validate a bulk-edit CSV with pandas, as Code Interpreter writes it: emails, plans, seat counts,
renewal dates, duplicate ids. Same report and error CSV as validate_bulk_edit.py (the standard-library
version); runs on the `python-data` runtime."""
import datetime
import sys

import pandas as pd

indir = sys.argv[1] if len(sys.argv) > 1 else "/input"
outdir = sys.argv[2] if len(sys.argv) > 2 else "/output"
PLANS = {"free", "team", "business", "enterprise"}

df = pd.read_csv(f"{indir}/bulk_edit.csv", dtype=str, keep_default_na=False)
df["line"] = df.index + 2

checks = []
bad_email = ~df["email"].str.match(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")
checks.append(df.loc[bad_email, ["line", "email"]].assign(column="email", problem="not a valid address")
              .rename(columns={"email": "value"}))

bad_plan = ~df["plan"].isin(PLANS)
plan_hint = df["plan"].str.lower().map(lambda p: f"did you mean {p!r}?" if p in PLANS else "unknown plan")
checks.append(df.loc[bad_plan, ["line", "plan"]].assign(column="plan", problem=plan_hint[bad_plan])
              .rename(columns={"plan": "value"}))

seats = pd.to_numeric(df["seats"], errors="coerce")
is_int = df["seats"].str.fullmatch(r"\s*[+-]?\d+\s*")
seat_problem = pd.Series(None, index=df.index, dtype=object)
seat_problem[~is_int] = "not an integer"
seat_problem[is_int & ~seats.between(1, 1000)] = "out of range 1-1000"
checks.append(df.loc[seat_problem.notna(), ["line", "seats"]]
              .assign(column="seats", problem=seat_problem.dropna()).rename(columns={"seats": "value"}))


def date_problem(value):
    try:
        datetime.datetime.strptime(value, "%Y-%m-%d")
        return None
    except ValueError as e:
        return str(e)


dates = df["renewal_date"].map(date_problem)
checks.append(df.loc[dates.notna(), ["line", "renewal_date"]]
              .assign(column="renewal_date", problem=dates.dropna()).rename(columns={"renewal_date": "value"}))

dup = df["account_id"].duplicated(keep=False)
checks.append(df.loc[dup, ["line", "account_id"]].assign(column="account_id", problem="duplicate id")
              .rename(columns={"account_id": "value"}))

order = {"email": 0, "plan": 1, "seats": 2, "renewal_date": 3, "account_id": 4}
problems = pd.concat(checks, ignore_index=True)
problems = problems.sort_values(["line", "column"], key=lambda s: s.map(order) if s.name == "column" else s,
                                kind="stable")[["line", "column", "value", "problem"]]
problems.to_csv(f"{outdir}/bulk_edit_errors.csv", index=False, lineterminator="\r\n")
print(f"{len(df)} rows checked, {len(problems)} problems")
for p in problems.itertuples(index=False):
    print(*p, sep=" | ")
