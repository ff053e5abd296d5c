"""Runs a published Stepbox workflow over gRPC and saves its outputs: the call an orchestrator
makes (a Kubernetes CronJob, an Airflow task, a Temporal activity, an Argo template).

    python stepbox_client.py --server stepbox:50051 --workflow monthly-report@prod \
        --input sales=/data/in/sales.csv --output-dir /data/out

Exit codes: 0 every step succeeded (outputs written); 1 the run failed (a step failed or its
checks did; nothing written); 2 the request was refused (bad reference or inputs: do not retry);
3 the server could not be reached or was busy (retry later).

The token comes from `--token-file` or `STEPBOX_TOKEN_FILE` (never from the command line, which
other processes can read). `STEPBOX_SERVER`, `STEPBOX_DEADLINE_SECONDS` and `STEPBOX_CA_FILE`
give defaults for the other flags. Needs grpcio and the stubs generated from Stepbox's `proto/`
(`python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. proto/stepbox/v1/*.proto`).
"""

import argparse
import os
import pathlib
import sys

import grpc

from stepbox.v1 import executor_pb2, workflow_pb2, workflow_pb2_grpc

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}


def channel(server, ca_file=None):
    """A channel to `server` (`host:port`), TLS when a CA file is given."""
    if ca_file:
        creds = grpc.ssl_channel_credentials(pathlib.Path(ca_file).read_bytes())
        return grpc.secure_channel(server, creds)
    return grpc.insecure_channel(server)


def run_workflow(chan, workflow_ref, inputs, token=None, deadline=None, on_event=None):
    """Runs `workflow_ref` on `inputs` ({name: bytes}) and returns the final `WorkflowRun`.

    Every streamed event is passed to `on_event` (step queued, started, finished). Raises
    `grpc.RpcError` when the server refuses or cannot run it."""
    stub = workflow_pb2_grpc.StepWorkflowsStub(chan)
    request = workflow_pb2.RunWorkflowRequest(
        workflow_ref=workflow_ref,
        inputs=[executor_pb2.File(path=name, content=data) for name, data in sorted(inputs.items())],
    )
    metadata = [("authorization", f"Bearer {token}")] if token else None
    result = None
    for event in stub.RunWorkflow(request, timeout=deadline, metadata=metadata):
        kind = event.WhichOneof("event")
        if kind == "result":
            result = event.result
        elif on_event:
            on_event(event)
    if result is None:
        raise RuntimeError("the stream ended without a result")
    return result


def describe(event):
    kind = event.WhichOneof("event")
    if kind == "finished":
        f = event.finished
        return f"{f.id}: {f.status or 'not run'} {f.message}".rstrip()
    return f"{getattr(event, kind)}: {kind}"


def save_outputs(run, out_dir):
    """Writes the run's outputs under `out_dir` by output name; refuses names that would leave it."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for o in run.outputs:
        if o.content_omitted:
            raise RuntimeError(f"output {o.name} ({o.size} bytes) was too large to return inline")
        name = pathlib.PurePosixPath(o.name)
        if name.is_absolute() or ".." in name.parts or len(name.parts) != 1:
            raise RuntimeError(f"refusing output name {o.name!r}")
        target = out / (o.name + pathlib.PurePosixPath(o.file).suffix)
        target.write_bytes(o.content)
        written.append(target)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default=os.environ.get("STEPBOX_SERVER"), help="host:port of stepbox serve")
    p.add_argument("--workflow", required=True, help="NAME@REF of a published workflow")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--token-file", default=os.environ.get("STEPBOX_TOKEN_FILE"))
    p.add_argument("--ca-file", default=os.environ.get("STEPBOX_CA_FILE"))
    p.add_argument("--deadline", type=float, default=float(os.environ.get("STEPBOX_DEADLINE_SECONDS", "600")))
    args = p.parse_args(argv)
    if not args.server:
        p.error("--server (or STEPBOX_SERVER) is required, e.g. stepbox:50051")
    inputs = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep or not name:
            p.error(f"--input {item!r}: write NAME=PATH")
        try:
            inputs[name] = pathlib.Path(path).read_bytes()
        except OSError as e:
            p.error(f"--input {name}: {e}")
    token = pathlib.Path(args.token_file).read_text().strip() if args.token_file else None
    with channel(args.server, args.ca_file) as chan:
        try:
            run = run_workflow(chan, args.workflow, inputs, token, args.deadline,
                               on_event=lambda e: print(describe(e), file=sys.stderr, flush=True))
        except grpc.RpcError as e:
            print(f"stepbox: {e.code().name}: {e.details()}", file=sys.stderr)
            return 3 if e.code() in RETRYABLE else 2
    print(f"run {run.run_id}: {run.status} (manifest {run.manifest_digest})", file=sys.stderr)
    if run.status != "succeeded":
        return 1
    for path in save_outputs(run, args.output_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
