"""Validates what can be validated here of the deployment files (no container engine or cluster):
the Kubernetes manifests parse as YAML with the expected kinds and consistent ports and probes,
and the configuration files they carry pass `stepbox config check`."""
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import yaml

root = pathlib.Path(__file__).resolve().parent.parent
stepbox = os.environ["STEPBOX_BIN"]
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


docs = [d for d in yaml.safe_load_all((root / "deploy/k8s/stepbox.yaml").read_text()) if d]
kinds = {d["kind"]: d for d in docs}
check(sorted(kinds) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"],
      f"manifest kinds: {sorted(kinds)}")
dep = kinds["Deployment"]
container = dep["spec"]["template"]["spec"]["containers"][0]
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
check(container["readinessProbe"]["grpc"]["port"] == ports["grpc"], "readiness probe uses gRPC health on the gRPC port")
check(container["livenessProbe"]["grpc"]["port"] == ports["grpc"], "liveness probe uses gRPC health on the gRPC port")
check(container["securityContext"]["readOnlyRootFilesystem"] is True, "read-only root filesystem")
check(dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, "non-root")
check(dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"], "selector matches pod labels")
check(kinds["Service"]["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"], "service selects the pods")
check(kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"], "PDB selects the pods")
check(kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "HPA targets the deployment")
check("memory" in container["resources"]["requests"] and "cpu" in container["resources"]["requests"], "resource requests set")
mounts = {m["mountPath"] for m in container["volumeMounts"]}
check({"/tmp", "/var/cache/stepbox"} <= mounts, "writable paths are volumes")

dockerfile = (root / "Dockerfile").read_text()
check(re.search(r"^USER\s+10001", dockerfile, re.M) is not None, "Dockerfile runs as non-root")
check("guest-runtime/python/build.sh" in dockerfile, "Dockerfile builds the guest runtime")
check(len(re.findall(r"^FROM ", dockerfile, re.M)) >= 2, "Dockerfile is multi-stage")
check("guest-runtime/python-data/build.sh" in dockerfile and "STEPBOX_PYTHON_DATA_DIR=" in dockerfile,
      "Dockerfile builds and ships the python-data runtime")
cache = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "cache")
check(cache["emptyDir"]["sizeLimit"] in ("2Gi", "3Gi", "4Gi"),
      "the cache volume holds the compiled runtimes of python and python-data (~0.9 GB)")

# The hand-off example: a CronJob calling a published workflow through the client image.
cron_docs = [d for d in yaml.safe_load_all((root / "deploy/k8s/cronjob-monthly-report.yaml").read_text()) if d]
check([d["kind"] for d in cron_docs] == ["CronJob"], "cronjob manifest is one CronJob")
cron = cron_docs[0]["spec"]
fields = cron["schedule"].split()
check(len(fields) == 5 and all(re.fullmatch(r"[0-9*/,\-]+", f) for f in fields), f"cron schedule {cron['schedule']!r} has 5 fields")
check(cron.get("timeZone") == "Europe/Berlin", "cron schedule has an explicit time zone")
check(cron.get("concurrencyPolicy") == "Forbid", "runs never overlap")
job = cron["jobTemplate"]["spec"]
pod = job["template"]["spec"]
client = pod["containers"][0]
check(pod["securityContext"]["runAsNonRoot"] is True and client["securityContext"]["readOnlyRootFilesystem"] is True,
      "client runs non-root on a read-only root filesystem")
env = {e["name"]: e.get("value") for e in client["env"]}
check(float(env["STEPBOX_DEADLINE_SECONDS"]) < job["activeDeadlineSeconds"], "gRPC deadline below the job's activeDeadlineSeconds")
token_mount = next(m for m in client["volumeMounts"] if m["name"] == "token")
token_volume = next(v for v in pod["volumes"] if v["name"] == "token")
check(env["STEPBOX_TOKEN_FILE"].startswith(token_mount["mountPath"] + "/") and "secret" in token_volume,
      "bearer token read from a mounted Secret, not from args or env")
check(not any("token" in a.lower() for a in client["args"]), "no token on the command line")
check(any(re.fullmatch(r"--workflow=[a-z0-9-]+@[a-z0-9]+", a) for a in client["args"]), "client runs a published NAME@REF")
rules = job["podFailurePolicy"]["rules"]
check(any(r["action"] == "FailJob" and set(r["onExitCodes"]["values"]) == {1, 2} for r in rules),
      "failed checks (1) and refusals (2) are not retried")
client_dockerfile = (root / "deploy/clients/Dockerfile").read_text()
protos = sorted(str(p.relative_to(root)) for p in (root / "proto/stepbox/v1").glob("*.proto"))
check(all("/" + p in client_dockerfile for p in protos), f"client image generates stubs for every proto: {protos}")
check(re.search(r"^USER\s+10001", client_dockerfile, re.M) is not None, "client image runs as non-root")

with tempfile.TemporaryDirectory() as tmp:
    tokens = pathlib.Path(tmp, "tokens")
    tokens.write_text("an-example-token\n")
    for name, text in [("deploy/stepbox.toml", (root / "deploy/stepbox.toml").read_text()),
                       ("ConfigMap stepbox.toml", kinds["ConfigMap"]["data"]["stepbox.toml"])]:
        cfg = pathlib.Path(tmp, "stepbox.toml")
        cfg.write_text(text.replace("/etc/stepbox/tokens/default", str(tokens)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("STEPBOX_")}
        r = subprocess.run([stepbox, "config", "check", "--config", str(cfg)], capture_output=True, text=True, env=env)
        check(r.returncode == 0, f"{name} passes `stepbox config check`")
        if r.returncode != 0:
            print(r.stderr)

print(f"{len(failures)} failed" if failures else "deployment files OK")
sys.exit(1 if failures else 0)
