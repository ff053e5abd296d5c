#!/usr/bin/env bash
# Builds the Python runtime component: CPython 3.14 pre-initialised by componentize-py with the
# runner in app/, the world in wit/ and the pinned pure-Python packages of requirements.txt.
# Output: target/guest/python-runtime.wasm, plus the license texts of CPython and of the packages.
# Rebuilds only when the inputs changed. Needs python3 with venv/pip and access to PyPI.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${STEPBOX_GUEST_DIR:-$root/target/guest}"
componentize_version="0.25.1"   # pinned: the runner relies on its bindings' names
mkdir -p "$out"

stamp_input="$componentize_version $(cat "$here/build.sh" "$here/requirements.txt" "$here"/app/*.py "$here"/wit/*.wit "$here"/wit/deps/*/*.wit | sha256sum)"
if [[ -f "$out/python-runtime.wasm" && -f "$out/python-runtime.stamp" && "$(cat "$out/python-runtime.stamp")" == "$stamp_input" ]]; then
  echo "python runtime: up to date ($out/python-runtime.wasm)"
  exit 0
fi

venv="$out/venv"
if [[ ! -x "$venv/bin/componentize-py" ]] || ! "$venv/bin/pip" show componentize-py 2>/dev/null | grep -q "^Version: $componentize_version\$"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$componentize_version"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The bundled packages, exactly the pinned files (hash-checked, no dependency resolution), for
# CPython 3.14. The platform only picks the wheel of PyYAML and MarkupSafe, whose compiled parts are
# deleted below: both run their pure-Python code. Installed afresh into a build-time directory that
# only componentize-py reads; what the runner imports from it ends up in the snapshot.
site="$tmp/site"
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-compile --require-hashes --no-deps \
  --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.14 --implementation cp \
  --abi cp314 --target "$site" -r "$here/requirements.txt"
find "$site" \( -name '*.so' -o -name '*.c' \) -delete
rm -rf "$site/_yaml" "$site/bin"
echo "Bundle directory for stepbox_runner (see app/stepbox_packages.py)." > "$site/stepbox-bundle.txt"

# Each package's license texts, from its installed dist-info, next to the component.
python3 - "$site" "$tmp/LICENSES-packages.txt" <<'PY'
import email.parser, pathlib, sys
site, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
parts = ["Third-party Python packages bundled into the Stepbox `python` runtime component.\n"
         "Each package's license text follows, as shipped in its wheel's dist-info.\n"]
for info in sorted(site.glob("*.dist-info"), key=lambda p: p.name.lower()):
    meta = email.parser.Parser().parsestr((info / "METADATA").read_text(encoding="utf-8"), headersonly=True)
    license = meta.get("License-Expression") or meta.get("License") or ""
    classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier", []) if c.startswith("License ::")]
    files = meta.get_all("License-File", []) or [p.name for p in info.iterdir() if p.name.upper().startswith(("LICEN", "COPYING"))]
    texts = []
    for name in files:
        for candidate in (info / "licenses" / name, info / name):
            if candidate.is_file():
                texts.append(f"--- {name} ---\n{candidate.read_text(encoding='utf-8', errors='replace').rstrip()}\n")
                break
    if not texts:
        sys.exit(f"no license text found in {info.name}")
    parts.append(f"\n{'=' * 100}\n{meta['Name']} {meta['Version']}\nLicense: "
                 f"{'; '.join(dict.fromkeys(x for x in [license.splitlines()[0] if license else '', *classifiers] if x))}\n"
                 f"{'=' * 100}\n" + "\n".join(texts))
dest.write_text("".join(parts), encoding="utf-8")
PY

# componentize-py runs the app's top level (the stdlib and bundle import sweeps) and snapshots the
# result. Once any -p is given the default `.` is dropped: app and the bundle are the search path.
(cd "$here" && "$venv/bin/componentize-py" -q -d wit -w runner componentize -p app -p "$site" stepbox_runner -o "$tmp/python-runtime.wasm")
mv "$tmp/python-runtime.wasm" "$out/python-runtime.wasm"
cp "$here/LICENSE-CPython.txt" "$out/python-runtime.LICENSE-CPython.txt"
cp "$tmp/LICENSES-packages.txt" "$out/python-runtime.LICENSES-packages.txt"
echo "$stamp_input" > "$out/python-runtime.stamp"
echo "python runtime: built $out/python-runtime.wasm ($(du -h "$out/python-runtime.wasm" | cut -f1))"
