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
