"""The hand-off example of docs/scaling.md, run for real: the Kubernetes CronJob's client
(deploy/clients/stepbox_client.py), with the args and environment written in
deploy/k8s/cronjob-monthly-report.yaml (only the mount points are mapped to a temporary
directory and the Service name to the test server), calls `RunWorkflow` on a real
`stepbox serve` whose catalog holds the published and promoted Tableau -> bulk-edit workflow.

Run by scripts/grpc-client-test.sh (stubs on PYTHONPATH, STEPBOX_BIN set).
"""
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import unittest

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
CLIENT = ROOT / "deploy/clients/stepbox_client.py"
TOKEN = "handoff-test-token"


class CronJobHandOff(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = pathlib.Path(cls.tmp.name)
        cls.dir = d
        stepbox = os.environ["STEPBOX_BIN"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEPBOX_")}
        env.update(XDG_DATA_HOME=str(d / "data"), STEPBOX_WORK_ROOT=str(d / "work"))
        for k in ("STEPBOX_CACHE_DIR", "STEPBOX_PYTHON_COMPONENT"):
            if k in os.environ:
                env[k] = os.environ[k]
        hashed = subprocess.run([stepbox, "config", "hash-token", TOKEN], capture_output=True, text=True,
                                env=env, check=True).stdout.strip()
        (d / "work").mkdir()
        config = d / "stepbox.toml"
        config.write_text(
            f'[server]\naddr = "127.0.0.1:0"\n[catalog]\ndatabase = "sqlite://{d}/catalog.db"\n'
            f'[[tenants]]\nname = "reports"\ntokens = ["{hashed}"]\ncatalog = ["run"]\n'
        )
        env["STEPBOX_CONFIG"] = str(config)

        def cli(*args):
            r = subprocess.run([stepbox, *args], capture_output=True, text=True, env=env)
            assert r.returncode == 0, f"stepbox {' '.join(args)}: {r.stdout}{r.stderr}"
            return r.stdout

        for path, name in [("tableau-bulk-edit/transform.step.toml", "tableau-to-bulk-edit"),
                           ("bulk-edit-validator/step.toml", "bulk-edit-validator"),
                           ("tableau-bulk-edit/report.step.toml", "bulk-edit-report")]:
            cli("step", "publish", str(EXAMPLES / path))
            cli("step", "promote", f"{name}@v1", "--to", "prod")
        cli("workflow", "publish", str(EXAMPLES / "tableau-bulk-edit/workflow.toml"))
        cli("workflow", "promote", "tableau-bulk-edit-check@v1", "--to", "prod")

        cls.server = subprocess.Popen([stepbox, "serve"], stdout=subprocess.PIPE, text=True, env=env)
        line = cls.server.stdout.readline()
        assert line.startswith("listening on "), f"unexpected first line {line!r}"
        cls.addr = line.split()[-1]

    @classmethod
    def tearDownClass(cls):
        cls.server.send_signal(signal.SIGTERM)
        code = cls.server.wait(timeout=30)
        cls.tmp.cleanup()
        assert code == 0, f"stepbox serve exited with {code} after SIGTERM"

    def cronjob_client(self, data, token_text=TOKEN, workflow=None):
        """Runs the CronJob's container command with its own args and env, mapped to `data`."""
        spec = next(d for d in yaml.safe_load_all((ROOT / "deploy/k8s/cronjob-monthly-report.yaml").read_text()) if d)
        container = spec["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        token_dir = self.dir / "secret"
        token_dir.mkdir(exist_ok=True)
        (token_dir / "token").write_text(token_text + "\n")
        args = [a.replace("/data/", f"{data}/") for a in container["args"]]
        if workflow:
            args = [f"--workflow={workflow}" if a.startswith("--workflow=") else a for a in args]
        env = dict(os.environ)
        for e in container["env"]:
            env[e["name"]] = e["value"]
        env["STEPBOX_SERVER"] = self.addr
        env["STEPBOX_TOKEN_FILE"] = env["STEPBOX_TOKEN_FILE"].replace("/etc/stepbox-client", str(token_dir))
        return subprocess.run([sys.executable, str(CLIENT), *args], capture_output=True, text=True, env=env, timeout=300)

    def data_dir(self, name):
        data = self.dir / name
        (data / "in").mkdir(parents=True)
        (data / "in/accounts_crosstab.csv").write_bytes((EXAMPLES / "tableau-bulk-edit/accounts_crosstab.csv").read_bytes())
        return data

    def test_the_cronjob_runs_the_published_workflow_and_writes_its_outputs(self):
        data = self.data_dir("month")
        r = self.cronjob_client(data)
        self.assertEqual(r.returncode, 0, r.stderr)
        for step in ("transform", "validate", "report"):
            self.assertIn(f"{step}: SUCCEEDED", r.stderr)
        self.assertIn("succeeded (manifest ", r.stderr)
        self.assertEqual((data / "out/report.md").read_bytes(),
                         (EXAMPLES / "tableau-bulk-edit/expected/report.md").read_bytes())
        self.assertEqual((data / "out/errors.csv").read_bytes(),
                         (EXAMPLES / "bulk-edit-validator/expected/bulk_edit_errors.csv").read_bytes())

    def test_a_wrong_token_or_reference_is_a_refusal_not_a_retry(self):
        r = self.cronjob_client(self.data_dir("bad-token"), token_text="not-the-token")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("UNAUTHENTICATED", r.stderr)
        r = self.cronjob_client(self.data_dir("bad-ref"), workflow="no-such-workflow@prod")
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("NOT_FOUND", r.stderr)
        self.assertFalse((self.dir / "bad-ref/out").exists())


if __name__ == "__main__":
    unittest.main()
