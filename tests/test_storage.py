import io
import json
import os

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ldm_jobs.jobs.spec import StorageSpec
from ldm_jobs.jobs.storage import (
    LocalStorage,
    NotFoundError,
    RetryPolicy,
    S3Storage,
    StorageError,
    is_transient,
    open_storage,
    resolve_endpoint,
)


def test_local_round_trip(tmp_path):
    storage = open_storage(str(tmp_path))
    assert isinstance(storage, LocalStorage)
    target = storage.join(str(tmp_path), "a", "b.bin")
    storage.write_atomic(target, b"hello")
    storage.write_atomic(storage.join(str(tmp_path), "c.bin"), b"x")
    assert storage.read_bytes(target) == b"hello"
    assert storage.exists(target) and not storage.exists(target + "x")
    assert storage.list(str(tmp_path)) == sorted([target, os.path.join(str(tmp_path), "c.bin")])
    assert storage.is_dir(str(tmp_path / "a"))
    # No temp files remain beside the target.
    assert sorted(os.listdir(tmp_path / "a")) == ["b.bin"]
    storage.delete(target)
    storage.delete(target)  # deleting twice is fine
    assert not storage.exists(target)
    assert storage.list(str(tmp_path / "missing")) == []
    with pytest.raises(StorageError, match="b.bin: cannot read"):
        storage.read_bytes(target)


def test_unknown_scheme():
    with pytest.raises(StorageError, match="unsupported scheme 'gs'"):
        open_storage("gs://bucket/x")


def test_endpoint_resolution(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert resolve_endpoint(None) == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:2")
    assert resolve_endpoint(None) == "http://s3only:2"
    assert resolve_endpoint(StorageSpec(endpoint_url="http://spec:3")) == "http://spec:3"


def test_s3_round_trip(s3_server):
    bucket = s3_server.make_bucket()
    storage = open_storage(f"s3://{bucket}/x", StorageSpec(endpoint_url=s3_server.endpoint_url))
    assert isinstance(storage, S3Storage)
    base = f"s3://{bucket}/runs/demo"
    storage.write_atomic(storage.join(base, "part-00000.parquet"), b"one")
    storage.write_atomic(storage.join(base, "_shards", "part-00000.json"), b"{}")
    storage.write_atomic(f"s3://{bucket}/runs/demo2/other", b"not listed under runs/demo")
    assert storage.list(base) == [f"{base}/_shards/part-00000.json", f"{base}/part-00000.parquet"]
    assert storage.read_bytes(f"{base}/part-00000.parquet") == b"one"
    assert storage.exists(f"{base}/part-00000.parquet")
    assert not storage.exists(f"{base}/part-00001.parquet")
    assert storage.is_dir(base) and not storage.is_dir(f"s3://{bucket}/nothing")
    storage.delete(f"{base}/part-00000.parquet")
    assert not storage.exists(f"{base}/part-00000.parquet")
    with pytest.raises(StorageError, match=f"s3://{bucket}/runs/demo/gone.*no such key"):
        storage.read_bytes(f"{base}/gone")
    # boto3 sees what we wrote, with a plain client against the same server.
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    assert client.get_object(Bucket=bucket, Key="runs/demo/_shards/part-00000.json")[
        "Body"].read() == b"{}"


def test_s3_missing_bucket_is_a_clear_error(s3_server):
    storage = open_storage("s3://no-such-bucket-here/x")  # endpoint from AWS_ENDPOINT_URL_S3
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        storage.write_atomic("s3://no-such-bucket-here/k", b"x")
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        storage.list("s3://no-such-bucket-here/prefix")


def test_s3_multipart_upload(s3_server, monkeypatch):
    monkeypatch.setattr("ldm_jobs.jobs.storage.s3.MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    bucket = s3_server.make_bucket()
    storage = open_storage(f"s3://{bucket}")
    data = os.urandom(6 * 1024 * 1024)
    storage.write_atomic(f"s3://{bucket}/big.bin", data)
    assert storage.read_bytes(f"s3://{bucket}/big.bin") == data


def test_pyarrow_reads_s3_parquet(s3_server):
    bucket = s3_server.make_bucket()
    storage = open_storage(f"s3://{bucket}")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a", "b"]}), buffer)
    storage.write_atomic(f"s3://{bucket}/t.parquet", buffer.getvalue())
    fs = storage.arrow_filesystem()
    table = pq.read_table(storage.arrow_path(f"s3://{bucket}/t.parquet"), filesystem=fs)
    assert table.column("prompt").to_pylist() == ["a", "b"]


def test_local_open_input_file(tmp_path):
    storage = open_storage(str(tmp_path))
    pq.write_table(pa.table({"prompt": ["a", "b", "c"]}), tmp_path / "t.parquet")
    parquet = pq.ParquetFile(storage.open_input_file(str(tmp_path / "t.parquet")))
    assert parquet.read().column("prompt").to_pylist() == ["a", "b", "c"]


def test_s3_parquet_through_storage(s3_server):
    bucket = s3_server.make_bucket()
    storage = open_storage(f"s3://{bucket}")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(500)]}), buffer,
                   row_group_size=100)
    storage.write_atomic(f"s3://{bucket}/t.parquet", buffer.getvalue())
    parquet = pq.ParquetFile(storage.open_input_file(f"s3://{bucket}/t.parquet"))
    assert parquet.metadata.num_rows == 500
    assert parquet.read_row_group(3).column("prompt").to_pylist()[0] == "p300"
    with pytest.raises(NotFoundError, match=f"s3://{bucket}/nope.parquet.*no such key"):
        storage.open_input_file(f"s3://{bucket}/nope.parquet")


def test_transient_classification():
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ParamValidationError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    for error in [client_error("SlowDown", 503), client_error("InternalError", 500),
                  client_error("503", 503), client_error("RequestTimeout", 400),
                  client_error("Weird", 502), client_error("TooManyRequests", 429),
                  EndpointConnectionError(endpoint_url="http://h"),
                  ConnectionClosedError(endpoint_url="http://h"),
                  ReadTimeoutError(endpoint_url="http://h"),
                  ResponseStreamingError(error="reset"), ConnectionResetError()]:
        assert is_transient(error), error
    for error in [client_error("AccessDenied", 403), client_error("NoSuchKey", 404),
                  client_error("NoSuchBucket", 404), client_error("NotImplemented", 501),
                  client_error("InvalidArgument", 400), NoCredentialsError(),
                  ParamValidationError(report="bad"), StorageError("x"), ValueError("x")]:
        assert not is_transient(error), error


def test_retry_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("LDM_JOBS_S3_ATTEMPTS", "4")
    monkeypatch.setenv("LDM_JOBS_S3_RETRY_BASE", "0.125")
    policy = RetryPolicy.current()
    assert (policy.attempts, policy.base_seconds) == (4, 0.125)
    assert 0.0625 <= policy.backoff(1) <= 0.125 and 0.125 <= policy.backoff(2) <= 0.25
    monkeypatch.setenv("LDM_JOBS_S3_ATTEMPTS", "many")
    with pytest.raises(StorageError, match="LDM_JOBS_S3_ATTEMPTS='many'"):
        RetryPolicy.current()


ENDPOINT_SECRET = "ENDPOINT-SECRET-0123456789"


def test_endpoint_userinfo_from_the_environment_is_stripped(monkeypatch, caplog):

    import ldm_jobs.jobs.storage.s3

    monkeypatch.setattr(ldm_jobs.jobs.storage.s3, "_warned_endpoint_userinfo", set())
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://key:{ENDPOINT_SECRET}@generic:1/base")
    with caplog.at_level("WARNING", logger="ldm_jobs.jobs.storage.s3"):
        assert resolve_endpoint(None) == "http://generic:1/base"
        assert resolve_endpoint(None) == "http://generic:1/base"
    assert [r.getMessage() for r in caplog.records] == [
        "AWS_ENDPOINT_URL: credentials in the URL were ignored; they come from the AWS "
        "environment only (AWS_ACCESS_KEY_ID, ...)"]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"https://key:{ENDPOINT_SECRET}@s3only:2")
    assert resolve_endpoint(None) == "https://s3only:2"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"key:{ENDPOINT_SECRET}@bare:3")  # no scheme
    assert resolve_endpoint(None) == "bare:3"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://plain:4")
    assert resolve_endpoint(None) == "http://plain:4"
    assert ENDPOINT_SECRET not in caplog.text


def test_endpoint_with_credentials_in_the_environment_leaks_nowhere(
        s3_server, tmp_path, monkeypatch, caplog, capfd, fake_pipeline):
    import logging

    import ldm_jobs.jobs.storage.s3
    from ldm_jobs.jobs import sinks
    from ldm_jobs.jobs.plan import make_plan
    from ldm_jobs.jobs.readers import InputError
    from ldm_jobs.jobs.spec import parse_spec
    from ldm_jobs.jobs.worker import ShardWorker

    monkeypatch.setattr(ldm_jobs.jobs.storage.s3, "_warned_endpoint_userinfo", set())
    host_port = s3_server.endpoint_url.split("://", 1)[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://AKIAFAKE:{ENDPOINT_SECRET}@{host_port}")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://AKIAFAKE:{ENDPOINT_SECRET}@{host_port}")
    caplog.set_level(logging.DEBUG)
    bucket = s3_server.make_bucket()
    storage = open_storage(f"s3://{bucket}/in")
    assert storage.endpoint_url == s3_server.endpoint_url  # usable, without the userinfo
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["good", "bad"], "prompt": ["a red cube", ""]}), buffer)
    storage.write_atomic(f"s3://{bucket}/in/in.parquet", buffer.getvalue())

    def spec_for(input_path, output_path):
        return parse_spec({"input": {"path": input_path}, "output": {"path": output_path},
                           "sampling": {"width": 16, "height": 16, "steps": 2}})

    spec = spec_for(f"s3://{bucket}/in/", f"s3://{bucket}/out")
    plan = make_plan(spec)
    worker = ShardWorker(spec, pipeline=fake_pipeline)
    for shard in plan.shards:
        worker.run(shard)
    worker.close()
    manifest = sinks.finalize(spec, plan, 1.0)
    assert manifest["complete"] and manifest["counts"]["rejected"] == 1
    for path in storage.list(f"s3://{bucket}/out"):  # everything the job wrote
        assert ENDPOINT_SECRET.encode() not in storage.read_bytes(path), path
    assert ENDPOINT_SECRET not in json.dumps(manifest)

    messages = []
    with pytest.raises(InputError) as caught:
        make_plan(spec_for("s3://no-such-bucket-endpoint/in/", str(tmp_path / "out")))
    messages.append(str(caught.value))
    assert "bucket 'no-such-bucket-endpoint' does not exist" in messages[0]
    monkeypatch.setenv("LDM_JOBS_S3_ATTEMPTS", "2")
    monkeypatch.setenv("LDM_JOBS_S3_RETRY_BASE", "0")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://AKIAFAKE:{ENDPOINT_SECRET}@127.0.0.1:9")
    with pytest.raises(StorageError) as caught:  # nothing listens there, retried, logged
        open_storage("s3://b/k").read_bytes("s3://b/k")
    messages.append(str(caught.value))
    assert "127.0.0.1:9" in messages[1]
    captured = capfd.readouterr()
    for text in [*messages, caplog.text, captured.out, captured.err]:
        assert ENDPOINT_SECRET not in text
    assert "credentials in the URL were ignored" in caplog.text
