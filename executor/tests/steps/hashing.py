"""Fingerprint every input: sha256, md5, blake2b, crc32, an HMAC, and base64 of the head."""
import base64
import hashlib
import hmac
import os
import sys
import zlib

indir, outdir = sys.argv[1], sys.argv[2]
lines = []
for name in sorted(os.listdir(indir)):
    data = open(os.path.join(indir, name), "rb").read()
    lines.append(" ".join([
        name,
        hashlib.sha256(data).hexdigest(),
        hashlib.md5(data).hexdigest(),
        hashlib.blake2b(data, digest_size=16).hexdigest(),
        f"{zlib.crc32(data):08x}",
        hmac.new(b"key", data, hashlib.sha1).hexdigest(),
        base64.b64encode(data[:12]).decode(),
    ]))
open(os.path.join(outdir, "SHA256SUMS"), "w").write("".join(
    f"{hashlib.sha256(open(os.path.join(indir, n), 'rb').read()).hexdigest()}  {n}\n" for n in sorted(os.listdir(indir))))
print("\n".join(lines))
