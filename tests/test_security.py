"""Security: no unpickling beyond weights, no secret in outputs or messages, a closed cluster.

Malicious checkpoints: tests/test_weights.py::test_malicious_pickle_is_refused_not_run
loads a .ckpt whose pickle would run a shell command (both torch.save's zip format and a
bare pickle) and checks that it is refused with "refused: not a plain weights file" and
that the command never ran. The static check below keeps every torch.load in the code
at weights_only=True, so that test speaks for all of them.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ldm_jobs.jobs.cli import main
from ldm_jobs.jobs.plan import make_plan
from ldm_jobs.jobs.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("model", "jobs")


# ---- unpickling --------------------------------------------------------------------------

def unsafe_loads(source: str, filename: str) -> list[str]:
    """`file:line call` for every torch.load not pinned to weights_only=True, and every
    pickle-family load, in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
        name = f"{owner}.{node.func.attr}"
        if name == "torch.load":
            pinned = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                         and k.value.value is True for k in node.keywords)
            if not pinned:
                found.append(f"{filename}:{node.lineno} {name} without weights_only=True")
        elif owner in ("pickle", "cloudpickle", "dill", "joblib") and node.func.attr in (
                "load", "loads"):
            found.append(f"{filename}:{node.lineno} {name}")
        elif name == "numpy.load" or (owner == "np" and node.func.attr == "load"):
            if not any(k.arg == "allow_pickle" and isinstance(k.value, ast.Constant)
                       and k.value.value is False for k in node.keywords):
                found.append(f"{filename}:{node.lineno} {name} may unpickle")
    return found


def test_unsafe_load_finder_flags_what_it_should():
    bad = ("import torch, pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "pickle.loads(b)\n")
    assert len(unsafe_loads(bad, "x.py")) == 3
    assert unsafe_loads("torch.load(p, map_location='cpu', weights_only=True)\n", "x.py") == []


def test_checkpoints_are_only_loaded_as_weights():
    files = [p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    assert any(p.name == "checkpoint_files.py" for p in files)
    problems = [hit for p in files
                for hit in unsafe_loads(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert problems == []
    # And there is at least one guarded load: the scan is looking at the real loader.
    assert "weights_only=True" in (ROOT / "model" / "checkpoint_files.py").read_text()


# ---- the cluster stays closed ---------------------------------------------------------------

PRIVATE_PORTS = (8265, 10001)  # dashboard / Jobs API, Ray client
PUBLIC_RANGES = ("0.0.0.0/0", "::/0")


def exposure_problems(config: dict) -> list[str]:
    """Ways in which cluster.yaml would expose the dashboard or Ray client port."""
    problems = []
    group = config.get("provider", {}).get("security_group")
    if not isinstance(group, dict):
        problems.append("provider.security_group is missing: the launcher's default is used")
        group = {}
    for rule in group.get("IpPermissions", []) or []:
        cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
        cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
        if not any(cidr in PUBLIC_RANGES for cidr in cidrs):
            continue
        low, high = rule.get("FromPort", -1), rule.get("ToPort", -1)
        all_ports = str(rule.get("IpProtocol")) == "-1" or low in (-1, None)
        for port in PRIVATE_PORTS:
            if all_ports or low <= port <= high:
                problems.append(f"security group opens port {port} to {cidrs}")
    for name, node_type in config.get("available_node_types", {}).items():
        if "SecurityGroupIds" in node_type.get("node_config", {}):
            problems.append(f"node type {name} brings its own security groups: check them")
    commands = " ".join(config.get("head_start_ray_commands", [])
                        + config.get("worker_start_ray_commands", []))
    words = commands.replace("=", " ").split()
    for flag in ("--dashboard-host", "--ray-client-server-host"):
        if flag in words:
            host = words[words.index(flag) + 1]
            if host not in ("127.0.0.1", "localhost", "::1"):
                problems.append(f"{flag} {host}: reachable from outside the head")
    options = " ".join(config.get("docker", {}).get("run_options", [])
                       + config.get("docker", {}).get("head_run_options", []))
    for port in PRIVATE_PORTS:
        if f":{port}" in options or f"-p {port}" in options:
            problems.append(f"docker publishes port {port}")
    return problems


def test_cluster_yaml_keeps_dashboard_and_client_inside():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert exposure_problems(config) == []
    # The check is not vacuous: each kind of opening is caught.
    opened = json.loads(json.dumps(config))
    opened["provider"]["security_group"]["IpPermissions"] = [
        {"FromPort": 8000, "ToPort": 9000, "IpProtocol": "tcp",
         "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    opened["head_start_ray_commands"] = ["ray start --head --dashboard-host=0.0.0.0"]
    opened["docker"]["run_options"] = ["-p 10001:10001"]
    assert exposure_problems(opened) == [
        "security group opens port 8265 to ['0.0.0.0/0']",
        "--dashboard-host 0.0.0.0: reachable from outside the head",
        "docker publishes port 10001"]


# ---- no secret in outputs, logs or messages ------------------------------------------------

ENV_SECRETS = {"AWS_SECRET_ACCESS_KEY": "ENVSECRETwJalrXUtnFEMIK7MDENG",
               "AWS_SESSION_TOKEN": "ENVTOKENFwoGZXIvYXdzEFAKESESSION"}
URL_SECRET = "SECRETFAKE9Qx7"
SECRETS = [*ENV_SECRETS.values(), URL_SECRET]


def leaks(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return [secret for secret in SECRETS if secret in text]


def test_no_secret_in_manifest_errors_output_or_messages(s3_server, ray_cluster, tmp_path,
                                                         monkeypatch, capfd):
    import boto3

    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    host_port = s3_server.endpoint_url.split("://", 1)[1]
    endpoint = f"http://AKIAFAKE:{URL_SECRET}@{host_port}"
    bucket = s3_server.make_bucket()
    pq.write_table(pa.table({"id": ["good", "bad"], "prompt": ["a red cube", ""]}),
                   tmp_path / "in.parquet")
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).put_object(
        Bucket=bucket, Key="in/in.parquet", Body=(tmp_path / "in.parquet").read_bytes())
    job = {"name": "secrets", "model": "builtin:tiny-random",
           "input": {"path": f"s3://{bucket}/in/"},
           "output": {"path": f"s3://{bucket}/out"},
           "sampling": {"steps": 2, "width": 32, "height": 32},
           "compute": {"actors": 1, "batch_size": 2},
           "storage": {"endpoint_url": endpoint, "region": "us-east-1"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    capfd.readouterr()

    with pytest.warns(UserWarning, match="storage.endpoint_url: credentials in the URL"):
        assert main(["run", str(tmp_path / "job.yaml")]) == 0

    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"out/_SUCCESS", "out/_manifest.json", "out/errors.parquet"} <= keys
    manifest = client.get_object(Bucket=bucket, Key="out/_manifest.json")["Body"].read()
    # The manifest shows that credentials were given (and dropped), never what they were.
    assert json.loads(manifest)["spec"]["storage"]["endpoint_url"] == f"http://***@{host_port}"
    assert json.loads(manifest)["counts"]["rejected"] == 1
    for key in keys:  # every file the job wrote, shards and records included
        assert leaks(client.get_object(Bucket=bucket, Key=key)["Body"].read()) == [], key
    captured = capfd.readouterr()
    assert "done: 1 images generated, 1 rows rejected" in captured.err  # the output was seen
    assert leaks(captured.out + captured.err) == []

    # Ray's own logs of this session (driver, raylet, actors).
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    logs = Path(node.get_logs_dir_path()) if node is not None else None
    if logs is not None and logs.is_dir():
        for path in logs.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert leaks(path.read_bytes()) == [], path

    # Failures: a missing bucket and an unreachable endpoint, both with userinfo.
    job["input"]["path"] = "s3://no-such-bucket-zz/in/"
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(job))
    with pytest.warns(UserWarning):
        assert main(["run", str(tmp_path / "missing.yaml"), "--quiet"]) == 2
    captured = capfd.readouterr()
    assert "bucket 'no-such-bucket-zz' does not exist" in captured.err
    assert leaks(captured.out + captured.err) == []
    job["storage"]["endpoint_url"] = f"http://AKIAFAKE:{URL_SECRET}@127.0.0.1:9"
    monkeypatch.setenv("LDM_JOBS_S3_ATTEMPTS", "1")  # nothing listens there: fail at once
    with pytest.warns(UserWarning):
        spec = parse_spec(job)
    with pytest.raises(Exception) as caught:
        make_plan(spec)
    assert "127.0.0.1:9" in str(caught.value)
    assert leaks(str(caught.value)) == [] and leaks(repr(caught.value)) == []
