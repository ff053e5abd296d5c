# Typical data steps, as a model or Code Interpreter writes them. The python-data tests run this
# file in the sandbox and in native CPython with the same pandas/numpy/matplotlib/openpyxl versions
# (target/py-data-venv) and compare stdout and the files written. Inputs come from IN (default
# /input); outputs go to the working directory.
import io
import os
import struct

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

IN = os.environ.get("IN", "/input")


def section(name):
    print(f"== {name}")


section("read_csv with dtypes and dates")
sales = pd.read_csv(
    f"{IN}/sales.csv",
    dtype={"region": "category", "units": "int64", "price": "float64"},
    parse_dates=["date"],
)
print(sales.dtypes.to_string())
print(sales.head(3).to_string())

section("groupby/agg")
agg = sales.groupby("region", observed=True).agg(
    units=("units", "sum"), revenue=("price", lambda p: float((p * sales.loc[p.index, "units"]).sum())),
    mean_price=("price", "mean"),
)
print(agg.round(4).to_string())

section("pivot_table")
sales["month"] = sales["date"].dt.to_period("M").astype(str)
pivot = pd.pivot_table(sales, values="units", index="region", columns="month", aggfunc="sum", fill_value=0, observed=True)
print(pivot.to_string())

section("merge")
regions = pd.read_csv(f"{IN}/regions.csv")
merged = sales.merge(regions, on="region", how="left", validate="many_to_one")
print(merged[["date", "region", "manager", "units"]].head(4).to_string())
print(merged["manager"].isna().sum())

section("resample")
daily = sales.set_index("date")["units"].resample("W").sum()
print(daily.to_string())

section("string cleanup")
names = pd.Series(["  Alice SMITH ", "bob  jones", None, "CAROL o'neil", "dave\tbrown"])
clean = names.str.strip().str.replace(r"\s+", " ", regex=True).str.title()
print(clean.to_list())
print(names.str.contains("o", case=False, na=False).to_list())

section("describe")
print(sales[["units", "price"]].describe().round(6).to_string())

section("value_counts")
print(sales["region"].value_counts().sort_index().to_string())

section("numpy")
a = np.arange(10)
print(a.dtype, np.array([1, 2, 3]).dtype, a.sum(), np.linspace(0, 1, 5).tolist())
print(round(float(np.std(sales["price"].to_numpy())), 10))

section("to_csv")
agg.to_csv("summary.csv")
print(os.path.getsize("summary.csv"))

section("to_excel with openpyxl")
with pd.ExcelWriter("report.xlsx", engine="openpyxl") as xw:
    agg.to_excel(xw, sheet_name="by region")
    pivot.to_excel(xw, sheet_name="pivot")
back = pd.read_excel("report.xlsx", sheet_name=None, engine="openpyxl")
for name, df in back.items():
    print(name, df.shape, df.iloc[0].to_list())

section("matplotlib PNG")
fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
agg["units"].plot.bar(ax=ax, title="Units by region")
fig.tight_layout()
fig.savefig("chart.png")
with open("chart.png", "rb") as f:
    head = f.read(24)
print(head[:8] == b"\x89PNG\r\n\x1a\n", struct.unpack(">II", head[16:24]))
