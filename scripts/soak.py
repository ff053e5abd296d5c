"""Soak test: N concurrent clients for M minutes against a real `stepbox serve`, mixing good steps,
limit-hitting steps, bad requests and run lookups. Reports outcomes by kind, the server's RSS at start and end,
and job directories left behind (must be 0). Exits non-zero on any unexpected outcome.

    scripts/soak.sh [--clients 8] [--minutes 5] [--bin target/release/stepbox]
"""
import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import grpc

from stepbox.v1 import executor_pb2 as pb
from stepbox.v1 import executor_pb2_grpc as rpc


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def step(source, **kw):
    return pb.RunStepRequest(step=pb.Step(runtime="python", source=source), **kw)


# (kind, request, what a correct server answers): a status for runs, a gRPC code for refusals.
MIX = [
    ("good", step("import json\nprint(json.dumps({'a': [1, 2]}))",
                  checks=[pb.Check(stdout_equals=b'{"a": [1, 2]}\n')]), pb.STATUS_SUCCEEDED),
    ("good_files", step("open('/output/r.csv','w').write(open('/input/a.csv').read().upper())",
                        inputs=[pb.File(path="a.csv", content=b"x,y\n1,2\n")]), pb.STATUS_SUCCEEDED),
    ("timeout", step("while True: pass", limits=pb.Limits(wall_time_ms=200)), pb.STATUS_TIMED_OUT),
    ("memory", step("b = bytearray(300 << 20)", limits=pb.Limits(memory_bytes=128 << 20)), pb.STATUS_MEMORY_EXCEEDED),
    ("fuel", step("while True: pass", limits=pb.Limits(fuel=50_000_000)), pb.STATUS_FUEL_EXHAUSTED),
    ("stdout", step("while True: print('x' * 100)", limits=pb.Limits(max_stdout_bytes=4096)), pb.STATUS_OUTPUT_EXCEEDED),
    ("disk", step("f = open('/output/big', 'wb')\nwhile True: f.write(b'x' * 65536)",
                  limits=pb.Limits(max_output_bytes=4 << 20)), pb.STATUS_OUTPUT_EXCEEDED),
    ("crash", step("raise ValueError('boom')"), pb.STATUS_FAILED),
    ("bad_path", step("print(1)", inputs=[pb.File(path="../escape", content=b"")]), grpc.StatusCode.INVALID_ARGUMENT),
    ("bad_limit", step("print(1)", limits=pb.Limits(memory_bytes=1 << 40)), grpc.StatusCode.INVALID_ARGUMENT),
    ("bad_policy", step("print(1)", policy="nope"), grpc.StatusCode.INVALID_ARGUMENT),
    # Run, then look the run up by id (GetRun) / list recent runs (ListRuns).
    ("lookup", step("print('again')"), pb.STATUS_SUCCEEDED),
    ("list", None, "listed"),
]


def call(stub, kind, req):
    """What the server answered: a run status, or "listed" for a good ListRuns page."""
    if kind == "list":
        page = stub.ListRuns(pb.ListRunsRequest(page_size=5), timeout=60)
        return "listed" if 1 <= len(page.runs) <= 5 and all(r.tenant == "local" for r in page.runs) else "bad page"
    done = stub.RunStep(req, timeout=60)
    if kind == "lookup":
        rec = stub.GetRun(pb.GetRunRequest(run_id=done.run_id), timeout=60)
        if rec.run_id != done.run_id or rec.manifest.digest != done.manifest.digest:
            return "wrong record"
        return rec.status
    return done.status


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=5)
    ap.add_argument("--bin", default="target/release/stepbox")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="stepbox-soak-")
    # Warnings and errors only: a line per run would drown the report.
    server = subprocess.Popen([args.bin, "serve", "--addr", "127.0.0.1:0", "--work-root", work, "--queue", "64"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "STEPBOX_LOG": "stepbox=warn"})
    addr = server.stdout.readline().split()[-1]
    channel = grpc.insecure_channel(addr)
    grpc.channel_ready_future(channel).result(timeout=60)
    stub = rpc.StepExecutorStub(channel)
    stub.RunStep(step("print(1)"), timeout=60)  # warm
    rss_start = rss_kib(server.pid)

    counts = collections.Counter()
    unexpected = collections.Counter()
    lock = threading.Lock()
    end = time.monotonic() + args.minutes * 60

    def client(seed):
        rnd = random.Random(seed)
        while time.monotonic() < end:
            kind, req, want = rnd.choice(MIX)
            try:
                got = call(stub, kind, req)
            except grpc.RpcError as e:
                got = e.code()
            ok = got == want or got == grpc.StatusCode.RESOURCE_EXHAUSTED
            with lock:
                counts[(kind, str(got))] += 1
                if not ok:
                    unexpected[(kind, str(got))] += 1
            if got == grpc.StatusCode.RESOURCE_EXHAUSTED:
                time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    samples = []
    while any(t.is_alive() for t in threads):
        time.sleep(1)
        if time.monotonic() - t0 >= 30 * (len(samples) + 1):
            samples.append(rss_kib(server.pid))
            print(f"  {time.monotonic() - t0:5.0f} s: server RSS {samples[-1]} KiB", flush=True)
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    rss_end = rss_kib(server.pid)
    channel.close()
    server.send_signal(signal.SIGTERM)
    code = server.wait(timeout=60)
    leftovers = os.listdir(work)
    os.rmdir(work) if not leftovers else None

    total = sum(counts.values())
    print(f"{args.clients} clients, {took:.0f} s, {total} requests ({total / took:.1f}/s)")
    for (kind, got), n in sorted(counts.items()):
        print(f"  {kind:<12} {got:<40} {n}")
    print(f"server RSS: {rss_start} KiB at start, {rss_end} KiB at end")
    print(f"server exit code after SIGTERM: {code}")
    print(f"job directories left behind: {len(leftovers)}")
    print(f"unexpected outcomes: {sum(unexpected.values())} {dict(unexpected) if unexpected else ''}")
    sys.exit(1 if unexpected or leftovers or code != 0 else 0)


if __name__ == "__main__":
    main()
