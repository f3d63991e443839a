"""S3 faults: transient ones are retried (bounded), permanent ones fail fast and clearly,
and nothing partial ever becomes visible.

The faults are real: a fault-injecting HTTP proxy (tests/s3_fault_proxy.py) sits between
the clients (boto3, pyarrow) and the moto server, and counts what reaches it. What ends
up stored is always checked with a plain client talking to moto directly.
"""

from __future__ import annotations

import io
import os
import sys
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
from s3_fault_proxy import FaultProxy

from ldm_jobs.jobs.readers import describe_file, read_slice
from ldm_jobs.jobs.storage import RetryPolicy, S3Storage, StorageError, scrub
from ldm_jobs.jobs.storage import s3 as storage_module
from ldm_jobs.jobs.worker import ShardWorker

# The worker factory below must reach Ray's actors by value (tests/ is not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# Test-sized backoff: the same number of attempts as in production, milliseconds apart.
FAST_RETRIES = {"LDM_JOBS_S3_RETRY_BASE": "0.01", "LDM_JOBS_S3_RETRY_MAX": "0.05"}
ATTEMPTS = storage_module.RETRY_ATTEMPTS
TRANSIENT = {
    "503": dict(action="error", status=503, code="SlowDown"),
    "500": dict(action="error", status=500, code="InternalError",
                message="We encountered an internal error. Please try again."),
    "reset": dict(action="reset"),
    "reset_response": dict(action="reset_response"),
}


@pytest.fixture
def fast_retries(monkeypatch):
    for name, value in FAST_RETRIES.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def proxy(s3_server):
    with FaultProxy(s3_server.endpoint_url) as running:
        yield running


@pytest.fixture
def direct(s3_server):
    """A plain client on moto itself, past the proxy: the ground truth."""
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")


@pytest.fixture
def bucket(s3_server):
    return s3_server.make_bucket(None)


@pytest.fixture
def store(proxy, fast_retries):
    return S3Storage(proxy.url, "us-east-1")


def _keys(direct, bucket: str, prefix: str = "") -> list[str]:
    reply = direct.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in reply.get("Contents", []))


def _uploads_in_progress(direct, bucket: str) -> list[str]:
    return [u["Key"] for u in direct.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


# --- transient faults are retried -----------------------------------------------------------


@pytest.mark.parametrize("fault", sorted(TRANSIENT))
def test_transient_faults_are_retried_on_every_operation(fault, store, proxy, direct, bucket):
    data = os.urandom(256 * 1024)  # big enough that a reset mid-response is mid-body
    direct.put_object(Bucket=bucket, Key="dir/seed.bin", Body=data)
    direct.put_object(Bucket=bucket, Key="dir/gone.bin", Body=b"x")
    base = f"s3://{bucket}"
    operations = [
        ("GET", "/dir/seed.bin", lambda: store.read_bytes(f"{base}/dir/seed.bin"), data),
        ("HEAD", "/dir/seed.bin", lambda: store.exists(f"{base}/dir/seed.bin"), True),
        ("GET", "prefix=dir/", lambda: store.list(f"{base}/dir"),
         [f"{base}/dir/gone.bin", f"{base}/dir/seed.bin"]),
        ("GET", "max-keys=1", lambda: store.is_dir(f"{base}/dir"), True),
        ("PUT", "/out/new.bin", lambda: store.write_atomic(f"{base}/out/new.bin", data), None),
        ("DELETE", "/dir/gone.bin", lambda: store.delete(f"{base}/dir/gone.bin"), None),
    ]
    for method, key, operation, expected in operations:
        proxy.clear()
        rule = proxy.add(method=method, key=key, count=2, **TRANSIENT[fault])
        assert operation() == expected, (method, key)
        assert rule.fired == 2, (method, key)
        # Two faults, then the one attempt that worked: each retry really went out.
        assert proxy.count(method, key) == 3, (method, key, proxy.hits)
    assert direct.get_object(Bucket=bucket, Key="out/new.bin")["Body"].read() == data
    assert _keys(direct, bucket) == ["dir/seed.bin", "out/new.bin"]


@pytest.mark.parametrize("fault", ["reset_request", "reset_upload", "reset_response"])
def test_write_broken_mid_body_is_retried_and_stored_whole(fault, store, proxy, direct, bucket):
    data = os.urandom(512 * 1024)
    rule = proxy.add(fault, method="PUT", key="/shard.bin", count=2)
    store.write_atomic(f"s3://{bucket}/shard.bin", data)
    assert rule.fired == 2 and proxy.count("PUT", "/shard.bin") == 3
    assert direct.get_object(Bucket=bucket, Key="shard.bin")["Body"].read() == data
    assert _keys(direct, bucket) == ["shard.bin"]


def test_read_timeout_is_retried(fast_retries, proxy, direct, bucket, monkeypatch):
    monkeypatch.setenv("LDM_JOBS_S3_READ_TIMEOUT", "0.5")
    slow = S3Storage(proxy.url, "us-east-1")
    direct.put_object(Bucket=bucket, Key="slow.bin", Body=b"patience")
    proxy.add("delay", method="GET", key="/slow.bin", seconds=2.0, count=1)
    assert slow.read_bytes(f"s3://{bucket}/slow.bin") == b"patience"
    assert proxy.count("GET", "/slow.bin") == 2  # the timeout cut the wait short: a retry


def _parquet(rows: int = 1000) -> bytes:
    buffer = io.BytesIO()
    table = pa.table({"id": [f"{i:05d}" for i in range(rows)],
                      "prompt": [f"prompt {i}" for i in range(rows)]})
    pq.write_table(table, buffer, row_group_size=100)
    return buffer.getvalue()


def test_parquet_reads_are_retried(store, proxy, direct, bucket):
    direct.put_object(Bucket=bucket, Key="in/p.parquet", Body=_parquet())
    path = f"s3://{bucket}/in/p.parquet"
    head = proxy.add("reset", method="HEAD", key="/in/p.parquet", count=2)
    get = proxy.add("error", method="GET", key="/in/p.parquet", status=503, count=2)
    cut = proxy.add("reset_response", method="GET", key="/in/p.parquet", count=2)
    assert describe_file(store, path, "prompt").rows == 1000
    table = read_slice(store, path, 250, 300, "prompt")
    assert table.column("id").to_pylist() == [f"{i:05d}" for i in range(250, 550)]
    assert (head.fired, get.fired, cut.fired) == (2, 2, 2)
    assert proxy.count(key="/in/p.parquet") > 6  # every fault was followed by a retry


def test_parquet_replaced_mid_read_is_an_error_not_a_mix(store, direct, bucket):
    direct.put_object(Bucket=bucket, Key="p.parquet", Body=_parquet())
    handle = store.open_input_file(f"s3://{bucket}/p.parquet")
    parquet = pq.ParquetFile(handle)  # footer read from the first version
    direct.put_object(Bucket=bucket, Key="p.parquet", Body=_parquet(999))
    with pytest.raises(StorageError, match="changed while being read"):
        parquet.read_row_group(0)


# --- nothing partial is ever visible --------------------------------------------------------


@pytest.mark.parametrize("fault", ["reset_request", "reset_upload", "500"])
def test_failed_write_leaves_no_object(fault, store, proxy, direct, bucket):
    options = TRANSIENT.get(fault, {"action": fault})
    proxy.add(method="PUT", key="/runs/x/part-00000.parquet", count=None, **options)
    with pytest.raises(StorageError) as failure:
        store.write_atomic(f"s3://{bucket}/runs/x/part-00000.parquet", os.urandom(300_000))
    assert f"s3://{bucket}/runs/x/part-00000.parquet" in str(failure.value)
    assert proxy.count("PUT") == ATTEMPTS
    assert _keys(direct, bucket) == []


@pytest.fixture
def small_parts(monkeypatch):
    monkeypatch.setattr(storage_module, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)


def test_multipart_with_transient_faults_completes_once(small_parts, store, proxy, direct,
                                                         bucket):
    data = os.urandom(11 * 1024 * 1024)  # parts of 5, 5 and 1 MiB
    part = proxy.add("reset_request", method="PUT", key="partNumber=2", count=2)
    # The first completion succeeds on the server, but its reply is cut off.
    done = proxy.add("reset_response", method="POST", key="uploadId=", count=1)
    store.write_atomic(f"s3://{bucket}/big.bin", data)
    assert part.fired == 2 and done.fired == 1
    assert proxy.count("PUT", "partNumber=2") == 3 and proxy.count("POST", "uploadId=") == 2
    assert direct.get_object(Bucket=bucket, Key="big.bin")["Body"].read() == data
    assert _keys(direct, bucket) == ["big.bin"]
    assert _uploads_in_progress(direct, bucket) == []


@pytest.mark.parametrize("first_try", ["reset_response", "reset"])
def test_multipart_completion_with_lost_reply(first_try, small_parts, store, proxy, direct,
                                              bucket):
    """Stores that forget a completed upload answer a repeated completion NoSuchUpload;
    that is a success only when the object there is the one our parts make."""
    data = os.urandom(11 * 1024 * 1024)
    proxy.add(first_try, method="POST", key="uploadId=", count=1)
    proxy.add("error", method="POST", key="uploadId=", status=404, code="NoSuchUpload",
              message="The specified upload does not exist.", count=None)
    if first_try == "reset_response":  # the server completed it: the object is ours
        store.write_atomic(f"s3://{bucket}/big.bin", data)
        assert direct.get_object(Bucket=bucket, Key="big.bin")["Body"].read() == data
    else:  # it never arrived: no object, and the upload is aborted
        with pytest.raises(StorageError, match=f"s3://{bucket}/big.bin.*NoSuchUpload"):
            store.write_atomic(f"s3://{bucket}/big.bin", data)
        assert _keys(direct, bucket) == []
    assert proxy.count("POST", "uploadId=") == 2
    assert _uploads_in_progress(direct, bucket) == []


def test_multipart_failing_part_is_aborted(small_parts, store, proxy, direct, bucket):
    direct.put_object(Bucket=bucket, Key="big.bin", Body=b"the old version")
    proxy.add("error", method="PUT", key="partNumber=2", status=500, code="InternalError",
              count=None)
    with pytest.raises(StorageError, match=f"s3://{bucket}/big.bin.*part 2"):
        store.write_atomic(f"s3://{bucket}/big.bin", os.urandom(11 * 1024 * 1024))
    assert proxy.count("PUT", "partNumber=2") == ATTEMPTS
    assert proxy.count("POST", "uploadId=") == 0  # never completed
    assert proxy.count("DELETE", "uploadId=") == 1  # aborted
    assert _uploads_in_progress(direct, bucket) == []
    # The key still holds what it held: no part of the failed upload shows.
    assert direct.get_object(Bucket=bucket, Key="big.bin")["Body"].read() == b"the old version"


# --- permanent faults fail fast, naming bucket and key ---------------------------------------


@pytest.mark.parametrize("operation", ["read", "write", "list", "delete", "exists", "parquet"])
def test_permanent_500_fails_after_bounded_retries(operation, store, proxy, direct, bucket):
    direct.put_object(Bucket=bucket, Key="data/obj.parquet", Body=_parquet(10))
    path = f"s3://{bucket}/data/obj.parquet"
    calls = {
        "read": lambda: store.read_bytes(path),
        "write": lambda: store.write_atomic(path, b"new"),
        "list": lambda: store.list(f"s3://{bucket}/data"),
        "delete": lambda: store.delete(path),
        "exists": lambda: store.exists(path),
        "parquet": lambda: describe_file(store, path, "prompt"),
    }
    proxy.add("error", status=500, code="InternalError", message="boom", count=None)
    started = time.monotonic()
    with pytest.raises(StorageError) as failure:
        calls[operation]()
    assert time.monotonic() - started < 20
    message = str(failure.value)
    assert f"bucket '{bucket}'" in message and "data/" in message, message
    assert f"gave up after {ATTEMPTS} attempts" in message
    assert proxy.count() == ATTEMPTS
    assert _keys(direct, bucket) == ["data/obj.parquet"]


def test_access_denied_is_not_retried(store, proxy, bucket):
    proxy.add("error", status=403, code="AccessDenied", message="Access Denied", count=None)
    with pytest.raises(StorageError, match=f"s3://{bucket}/k.bin.*access denied.*'{bucket}'"):
        store.write_atomic(f"s3://{bucket}/k.bin", b"x")
    assert proxy.count() == 1


def test_missing_bucket_is_not_retried(store, proxy):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        store.write_atomic("s3://no-such-bucket-x/a/k.bin", b"x")
    assert proxy.count() == 1


def test_deadline_bounds_the_total_time(proxy, bucket, monkeypatch):
    monkeypatch.setenv("LDM_JOBS_S3_ATTEMPTS", "1000")
    monkeypatch.setenv("LDM_JOBS_S3_RETRY_BASE", "0.05")
    monkeypatch.setenv("LDM_JOBS_S3_RETRY_MAX", "0.2")
    monkeypatch.setenv("LDM_JOBS_S3_RETRY_DEADLINE", "1.0")
    store = S3Storage(proxy.url, "us-east-1")
    proxy.add("reset", count=None)
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"s3://{bucket}/k.*gave up after"):
        store.read_bytes(f"s3://{bucket}/k")
    assert time.monotonic() - started < 3
    assert 3 <= proxy.count() < 1000


def test_default_policy_is_bounded(monkeypatch):
    for name in ["ATTEMPTS", "RETRY_BASE", "RETRY_MAX", "RETRY_DEADLINE"]:
        monkeypatch.delenv(f"LDM_JOBS_S3_{name}", raising=False)
    policy = RetryPolicy.current()
    assert 3 <= policy.attempts <= 10
    waits = [policy.backoff(retry) for retry in range(1, policy.attempts)]
    assert all(w <= policy.max_seconds for w in waits)
    assert sum(waits) < 30  # all the sleeping a failing request may do, at most
    ceilings = [min(policy.max_seconds, policy.base_seconds * 2 ** (r - 1)) for r in range(1, 5)]
    assert ceilings == sorted(ceilings) and ceilings[0] < ceilings[-1]  # exponential
    assert len({policy.backoff(3) for _ in range(20)}) > 1  # jittered
    monkeypatch.setattr(storage_module, "RETRY_ATTEMPTS", 2)
    assert RetryPolicy.current().attempts == 2  # constants are read when a client is made
    monkeypatch.setenv("LDM_JOBS_S3_ATTEMPTS", "3")
    assert RetryPolicy.current().attempts == 3  # and the environment wins


# --- no credentials in messages --------------------------------------------------------------


def test_credentials_never_appear_in_errors(proxy, bucket, monkeypatch, fast_retries):
    secret, token = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET", "FwoGZXIvYXdzTOKENTOKEN"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    host = proxy.url.split("//", 1)[1]
    store = S3Storage(f"http://someuser:hunter2pass@{host}", "us-east-1")
    store.write_atomic(f"s3://{bucket}/ok.bin", b"fine")  # the endpoint works without them
    messages = []
    for rule in [dict(action="reset"), dict(action="reset_response"),
                 dict(action="error", status=500, code="InternalError")]:
        proxy.clear()
        proxy.add(count=None, **rule)
        with pytest.raises(StorageError) as failure:
            store.read_bytes(f"s3://{bucket}/ok.bin")
        messages.append(str(failure.value))
    # Nobody listening: botocore's message quotes the endpoint URL.
    closed = S3Storage("http://someuser:hunter2pass@127.0.0.1:9", "us-east-1")
    with pytest.raises(StorageError) as failure:
        closed.read_bytes(f"s3://{bucket}/ok.bin")
    messages.append(str(failure.value))
    for message in messages:
        assert f"s3://{bucket}/ok.bin" in message
        for leak in ("someuser", "hunter2pass", secret, token):
            assert leak not in message, message
    assert "127.0.0.1:9" in messages[-1]
    assert scrub(f"see https://u:{secret}@h/x?X-Amz-Signature=abc&y=1") == \
        "see https://***@h/x?X-Amz-Signature=***&y=1"


# --- whole jobs through the proxy ------------------------------------------------------------

SIZE = 32
IDS = ["r0", "r1", "r2", "r3", "r4", "r5"]


def _prompts() -> bytes:
    table = pa.table({
        "id": IDS,
        "prompt": ["a red circle", "a blue square", "two dots", "a star", "a line", "bad"],
        "width": pa.array([None, None, None, None, None, 30], pa.int64()),  # r5: rejected
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _job(input_path: str, output_path: str, endpoint: str, actors: int = 1) -> dict:
    return {
        "name": "faults",
        "model": "builtin:tiny-random",
        "input": {"path": input_path, "id_column": "id"},
        "output": {"path": output_path, "rows_per_shard": 2},
        "sampling": {"steps": 2, "guidance_scale": 5.0, "width": SIZE, "height": SIZE},
        "compute": {"actors": actors, "batch_size": 2},
        "storage": {"endpoint_url": endpoint, "region": "us-east-1"},
    }


def fast_retry_worker(spec, device="cpu"):
    """Builds the usual worker inside the actor, after giving its process test backoff."""
    os.environ.update(FAST_RETRIES)
    return ShardWorker(spec, device=device)


def _read_output(direct, bucket: str, prefix: str) -> tuple[dict[str, bytes], list[str]]:
    images: dict[str, bytes] = {}
    for key in _keys(direct, bucket, prefix):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(".parquet") and "/_" not in key:
            body = direct.get_object(Bucket=bucket, Key=key)["Body"].read()
            table = pq.read_table(io.BytesIO(body), columns=["id", "image"])
            for image_id, image in zip(table.column("id").to_pylist(),
                                       table.column("image").to_pylist()):
                assert image_id not in images, f"{image_id} appears twice"
                images[image_id] = image
    body = direct.get_object(Bucket=bucket, Key=f"{prefix}errors.parquet")["Body"].read()
    return images, pq.read_table(io.BytesIO(body)).column("id").to_pylist()


@pytest.mark.usefixtures("ray_cluster")
def test_job_survives_intermittent_faults(s3_server, proxy, direct, bucket, fast_retries):
    from ldm_jobs.jobs.runner import run_job
    from ldm_jobs.jobs.spec import parse_spec

    direct.put_object(Bucket=bucket, Key="prompts/p.parquet", Body=_prompts())
    clean = parse_spec(_job(f"s3://{bucket}/prompts/", f"s3://{bucket}/clean",
                            s3_server.endpoint_url))
    run_job(clean, progress=False)

    rules = [
        # Reads of the input: the driver's planning and every worker's slice.
        proxy.add("error", method="GET", key="/prompts/p.parquet", status=503, every=2,
                  count=3),
        proxy.add("reset_response", method="GET", key="/prompts/p.parquet", count=1),
        proxy.add("reset", method="HEAD", key="/prompts/p.parquet", count=2),
        proxy.add("error", method="GET", key="list-type=2", status=503, every=2, count=3),
        # Writes of shards, their records and the job's last files.
        proxy.add("error", method="PUT", key="/faulty/part-00000.parquet", status=503, count=2),
        proxy.add("reset_request", method="PUT", key="/faulty/part-00001.parquet", count=1),
        proxy.add("reset_response", method="PUT", key="/faulty/part-00002.parquet", count=2),
        proxy.add("error", method="PUT", key="/faulty/_shards/part-00002", status=500,
                  code="InternalError", count=1),
        proxy.add("reset", method="PUT", key="/faulty/_shards/part-00001", count=1),
        proxy.add("reset_upload", method="PUT", key="/faulty/_manifest.json", count=1),
        proxy.add("error", method="DELETE", key="/faulty/_SUCCESS", status=500,
                  code="InternalError", count=1),
        proxy.add("reset_response", method="GET", key="/faulty/_shards/part-00000.json",
                  count=1),
    ]
    faulty = parse_spec(_job(f"s3://{bucket}/prompts/", f"s3://{bucket}/faulty", proxy.url,
                             actors=2))  # two workers: faults land on concurrent requests
    manifest = run_job(faulty, progress=False, worker_factory=fast_retry_worker)

    assert manifest["complete"]
    assert [rule.fired for rule in rules] == [rule.count for rule in rules], proxy.hits
    for rule in rules:  # each fault was followed by a request that got through
        assert proxy.count(rule.method, rule.key, "forward") >= 1, rule
    images, errors = _read_output(direct, bucket, "faulty/")
    clean_images, clean_errors = _read_output(direct, bucket, "clean/")
    assert sorted([*images, *errors]) == IDS and errors == ["r5"]
    assert images == clean_images and errors == clean_errors
    # The same objects as the clean run, no more (no stray temp or duplicate), no fewer.
    written = [key.removeprefix("faulty/") for key in _keys(direct, bucket, "faulty/")]
    assert written == [key.removeprefix("clean/") for key in _keys(direct, bucket, "clean/")]
    assert {"_SUCCESS", "_manifest.json", "errors.parquet", "part-00000.parquet",
            "part-00001.parquet", "part-00002.parquet"} <= set(written)
    assert _uploads_in_progress(direct, bucket) == []


@pytest.mark.usefixtures("ray_cluster")
def test_job_with_failing_output_bucket_fails_naming_it(proxy, direct, bucket, fast_retries):
    from ldm_jobs.jobs.runner import JobFailed, run_job
    from ldm_jobs.jobs.spec import parse_spec

    direct.put_object(Bucket=bucket, Key="prompts/p.parquet", Body=_prompts())
    proxy.add("error", method="PUT", key="/broken/", status=500, code="InternalError",
              count=None)
    spec = parse_spec(_job(f"s3://{bucket}/prompts/", f"s3://{bucket}/broken", proxy.url))
    started = time.monotonic()
    with pytest.raises(JobFailed) as failure:
        run_job(spec, progress=False, worker_factory=fast_retry_worker, max_attempts=2)
    assert time.monotonic() - started < 40
    message = str(failure.value)
    assert f"bucket '{bucket}'" in message, message
    assert f"s3://{bucket}/broken/part-0000" in message, message
    shard_key = message.split(f"s3://{bucket}/", 1)[1].split(":", 1)[0]
    # Both attempts at the shard made the full, bounded number of tries at its first write.
    assert proxy.count("PUT", f"/{shard_key}") == 2 * ATTEMPTS
    assert _keys(direct, bucket, "broken/") == []


def test_cli_reports_a_failing_output_store(proxy, bucket, direct, tmp_path, capsys,
                                            fast_retries):
    import yaml

    from ldm_jobs.jobs.cli import main

    direct.put_object(Bucket=bucket, Key="prompts/p.parquet", Body=_prompts())
    proxy.add("error", method="GET", key="prefix=out/", status=503, count=None)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(_job(f"s3://{bucket}/prompts/", f"s3://{bucket}/out",
                                        proxy.url)))
    assert main(["run", str(spec), "--quiet"]) != 0  # before any work starts
    err = capsys.readouterr().err
    assert f"s3://{bucket}/out/_shards/" in err and f"bucket '{bucket}'" in err, err
    assert "Traceback" not in err
    assert proxy.count("GET", "prefix=out/") == ATTEMPTS


# --- a writer killed mid-upload ----------------------------------------------------------------


def test_uploads_left_by_killed_writers_are_aborted_at_the_end(s3_server, direct, bucket):
    """A process killed inside a multipart upload leaves it open: invisible, but its parts
    are stored (and billed). The job's end aborts those of its own names, not others'."""
    from ldm_jobs.jobs.sinks import remove_stale_temps
    from ldm_jobs.jobs.spec import parse_spec

    for key in ("run/part-00003.parquet", "run/_shards/part-00003.errors.parquet",
                "run/errors.parquet", "run/notes/part-00001.parquet", "run/user-file.bin",
                "elsewhere/part-00000.parquet"):
        upload = direct.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        direct.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 10)
    spec = parse_spec({"input": {"path": "unused.parquet"},
                       "output": {"path": f"s3://{bucket}/run"}})
    assert remove_stale_temps(S3Storage(s3_server.endpoint_url, "us-east-1"), spec) == 3
    assert sorted(_uploads_in_progress(direct, bucket)) == [
        "elsewhere/part-00000.parquet", "run/notes/part-00001.parquet", "run/user-file.bin"]
