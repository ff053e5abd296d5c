"""A client nobody here wrote: Python grpcio stubs generated from proto/ at test time drive a real
`stepbox serve` process through RunStep, RunStepStream, health checking and server reflection.

Run by scripts/grpc-client-test.sh, which installs the pinned grpcio packages, generates the stubs
into a temporary directory on PYTHONPATH, and sets STEPBOX_BIN.
"""
import os
import signal
import subprocess
import tempfile
import unittest

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from google.protobuf import descriptor_pb2

from stepbox.v1 import executor_pb2 as pb
from stepbox.v1 import executor_pb2_grpc as rpc


class StepboxServer(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.work = tempfile.TemporaryDirectory()
        cls.server = subprocess.Popen(
            [os.environ["STEPBOX_BIN"], "serve", "--addr", "127.0.0.1:0", "--work-root", cls.work.name],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = cls.server.stdout.readline()
        assert line.startswith("listening on "), f"unexpected first line {line!r}"
        cls.addr = line.split()[-1]
        cls.channel = grpc.insecure_channel(cls.addr)
        grpc.channel_ready_future(cls.channel).result(timeout=30)
        cls.stub = rpc.StepExecutorStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        cls.server.send_signal(signal.SIGTERM)
        code = cls.server.wait(timeout=30)
        leftovers = os.listdir(cls.work.name)
        cls.work.cleanup()
        assert code == 0, f"stepbox serve exited with {code} after SIGTERM"
        assert leftovers == [], f"job directories left behind: {leftovers}"

    def python(self, source, **kw):
        return pb.RunStepRequest(step=pb.Step(runtime="python", source=source), **kw)

    def test_run_step_with_inputs_outputs_and_checks(self):
        req = self.python(
            "import csv\nrows = list(csv.reader(open('/input/a.csv')))\n"
            "open('/output/n.txt', 'w').write(str(len(rows)))\nprint('rows', len(rows))",
            inputs=[pb.File(path="a.csv", content=b"x,y\n1,2\n3,4\n")],
            checks=[
                pb.Check(name="count", stdout_equals=b"rows 3\n"),
                pb.Check(name="file", file_equals=pb.FileContent(path="n.txt", content=b"3")),
            ],
        )
        r = self.stub.RunStep(req, timeout=60)
        self.assertEqual(r.status, pb.STATUS_SUCCEEDED, r.message)
        self.assertEqual(r.stdout, b"rows 3\n")
        self.assertEqual([(f.path, f.content) for f in r.outputs], [("n.txt", b"3")])
        self.assertTrue(all(c.passed for c in r.check_results))
        self.assertEqual(len(r.manifest.digest), 64)

    def test_failed_check_is_a_status_with_a_reason(self):
        r = self.stub.RunStep(self.python("print('no')", checks=[pb.Check(stdout_matches="^yes")]), timeout=60)
        self.assertEqual(r.status, pb.STATUS_CHECKS_FAILED)
        self.assertFalse(r.check_results[0].passed)
        self.assertIn("does not match", r.check_results[0].detail)

    def test_limit_hit_is_a_status(self):
        req = self.python("while True:\n    pass\n", limits=pb.Limits(wall_time_ms=200))
        r = self.stub.RunStep(req, timeout=60)
        self.assertEqual(r.status, pb.STATUS_TIMED_OUT)
        self.assertIn("wall-time", r.message)

    def test_bad_request_is_invalid_argument_naming_the_field(self):
        req = self.python("print(1)", inputs=[pb.File(path="/etc/passwd", content=b"")])
        with self.assertRaises(grpc.RpcError) as e:
            self.stub.RunStep(req, timeout=60)
        self.assertEqual(e.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("inputs[0].path", e.exception.details())

    def test_deadline_stops_the_job(self):
        with self.assertRaises(grpc.RpcError) as e:
            self.stub.RunStep(self.python("while True:\n    pass\n"), timeout=0.5)
        self.assertEqual(e.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)

    def test_stream_sends_chunks_then_the_response(self):
        events = list(self.stub.RunStepStream(
            self.python("import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.05)"), timeout=60))
        kinds = [e.WhichOneof("event") for e in events]
        self.assertEqual(kinds[-1], "response")
        self.assertNotIn("response", kinds[:-1])
        self.assertEqual(b"".join(e.stdout for e in events if e.WhichOneof("event") == "stdout"), b"0\n1\n2\n")
        self.assertEqual(events[-1].response.status, pb.STATUS_SUCCEEDED)

    def test_listings(self):
        runtimes = self.stub.ListRuntimes(pb.ListRuntimesRequest(), timeout=10).runtimes
        self.assertEqual([r.name for r in runtimes], ["python", "wasm", "python-data"])
        by_name = {r.name: r for r in runtimes}
        self.assertTrue(by_name["python"].available and by_name["wasm"].available)
        self.assertTrue(by_name["python"].python_version.startswith("3.14"))
        self.assertIn("openpyxl", {p.name.lower() for p in by_name["python"].packages})
        data = by_name["python-data"]
        # Optional: either present with pandas, or absent with a reason that says how to get it.
        if data.available:
            self.assertIn("pandas", {p.name.lower() for p in data.packages})
        else:
            self.assertTrue(data.unavailable_reason)
        if os.environ.get("CI") == "true":
            self.assertTrue(data.available, f"CI builds python-data: {data.unavailable_reason}")
        policies = {p.name: p for p in self.stub.ListPolicies(pb.ListPoliciesRequest(), timeout=10).policies}
        self.assertIn("default", policies)
        self.assertGreater(policies["default"].default_limits.memory_bytes, 0)

    def test_health(self):
        health = health_pb2_grpc.HealthStub(self.channel)
        for service in ["", "stepbox.v1.StepExecutor"]:
            r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            self.assertEqual(r.status, health_pb2.HealthCheckResponse.SERVING)

    def test_reflection_describes_the_service_without_the_proto_file(self):
        stub = reflection_pb2_grpc.ServerReflectionStub(self.channel)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="stepbox.v1.StepExecutor"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
        names = {s.name for s in listed.list_services_response.service}
        self.assertIn("stepbox.v1.StepExecutor", names)
        self.assertIn("stepbox.v1.StepWorkflows", names)
        self.assertIn("grpc.health.v1.Health", names)
        files = {
            f.name: f
            for f in map(descriptor_pb2.FileDescriptorProto.FromString,
                         described.file_descriptor_response.file_descriptor_proto)
        }
        fd = files["stepbox/v1/executor.proto"]
        self.assertEqual(fd.package, "stepbox.v1")
        methods = [m.name for m in fd.service[0].method]
        self.assertEqual(methods, ["RunStep", "RunStepStream", "ListRuntimes", "ListPolicies", "GenerateStep",
                                   "ImportConversation", "GetRun", "ListRuns"])
        # Its import is served too, so a client can decode RunRecord's timestamps without files.
        self.assertEqual(list(fd.dependency), ["google/protobuf/timestamp.proto"])
        [dep] = list(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(file_by_filename="google/protobuf/timestamp.proto")]), timeout=10))
        ts = descriptor_pb2.FileDescriptorProto.FromString(dep.file_descriptor_response.file_descriptor_proto[0])
        self.assertEqual([m.name for m in ts.message_type], ["Timestamp"])

    def test_runs_can_be_looked_up_and_listed(self):
        done = self.stub.RunStep(self.python("print('remember me')"), timeout=60)
        rec = self.stub.GetRun(pb.GetRunRequest(run_id=done.run_id), timeout=10)
        self.assertEqual((rec.run_id, rec.tenant, rec.status), (done.run_id, "local", pb.STATUS_SUCCEEDED))
        self.assertEqual(rec.manifest.digest, done.manifest.digest)
        self.assertEqual(rec.stdout_bytes, len(b"remember me\n"))
        self.assertLessEqual(rec.submitted_at.ToNanoseconds(), rec.finished_at.ToNanoseconds())
        listed = self.stub.ListRuns(pb.ListRunsRequest(page_size=1), timeout=10)
        self.assertEqual(len(listed.runs), 1)
        with self.assertRaises(grpc.RpcError) as e:
            self.stub.GetRun(pb.GetRunRequest(run_id="no-such-run"), timeout=10)
        self.assertEqual(e.exception.code(), grpc.StatusCode.NOT_FOUND)


if __name__ == "__main__":
    unittest.main(verbosity=2)
