"""Pack the inputs into a zip (stored and deflated members) and a gzip, then read them back."""
import gzip
import io
import os
import sys
import zipfile

indir, outdir = sys.argv[1], sys.argv[2]
names = sorted(os.listdir(indir))
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    for i, name in enumerate(names):
        info = zipfile.ZipInfo(name, date_time=(2024, 1, 2, 3, 4, 6))
        info.compress_type = zipfile.ZIP_STORED if i % 2 else zipfile.ZIP_DEFLATED
        z.writestr(info, open(os.path.join(indir, name), "rb").read())
open(os.path.join(outdir, "bundle.zip"), "wb").write(buf.getvalue())
with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
    for info in z.infolist():
        data = z.read(info.filename)
        print(info.filename, info.file_size, f"{info.CRC:08x}", len(data), info.date_time)
raw = b"".join(open(os.path.join(indir, n), "rb").read() for n in names)
gz = gzip.compress(raw, mtime=0)
assert gzip.decompress(gz) == raw
print("gzip roundtrip ok", len(raw))
