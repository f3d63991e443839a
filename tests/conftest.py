"""Shared fixtures: a real S3-compatible server (moto, server mode) on loopback."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

# Nothing is ever fetched from a hub: diffusers, transformers and datasets stay offline.
for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_flag, "1")

# Dummy credentials for the loopback S3 server; set before any client is made.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint_url: str
    make_bucket: Callable[[str | None], str]  # returns the bucket's name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1; the AWS env points at it for the whole session.

    The endpoint is exported as AWS_ENDPOINT_URL_S3 too, so code that reads the
    standard variables (open_output, the CLI) finds the server unchanged.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in [*S3_ENV, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint

    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def make_bucket(name: str | None = None) -> str:
        name = name or f"bucket-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        return name

    try:
        yield S3Server(endpoint_url=endpoint, make_bucket=make_bucket)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class RayCluster:
    metrics_port: int  # the node's Prometheus endpoint: http://127.0.0.1:<port>/metrics


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> Iterator[RayCluster]:
    """One small local Ray for the whole session; `run_job` reuses it.

    It depends on `s3_server` so the AWS variables are set before Ray starts: the raylet,
    and so every actor, inherits the driver's environment at `ray.init` time. Its metrics
    reach the node's exporter every half second (Ray's default is 10 s).
    """
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    ray.init(
        num_cpus=2,
        num_gpus=0,
        object_store_memory=80 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=True,
        logging_level="WARNING",
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    try:
        yield RayCluster(metrics_port)
    finally:
        ray.shutdown()


class FakePipeline:
    """A stand-in for model.Pipeline: a deterministic image from each sample's settings.

    Prompts containing "REFUSE" make `generate` raise ValueError, as the real pipeline
    does for values it cannot serve, so tests can exercise per-row rejection.
    """

    name = "fake"
    content_hash = "0123456789abcdef" * 4
    native_size = (512, 512)  # what a job spec that leaves the size out gets

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate(self, prompts, seeds, negative_prompts=None, steps=30, guidance_scale=7.5,
                 sampler="dpmpp_2m", width=512, height=512, init_images=None, strength=0.75):
        import hashlib

        from PIL import Image

        self.calls.append({"prompts": list(prompts), "seeds": list(seeds), "steps": steps,
                           "sampler": sampler, "width": width, "height": height,
                           "init_images": init_images, "strength": strength})
        if any("REFUSE" in prompt for prompt in prompts):
            raise ValueError("prompts: refused by the fake pipeline")
        guidance = (guidance_scale if isinstance(guidance_scale, list)
                    else [guidance_scale] * len(prompts))
        negatives = negative_prompts or [""] * len(prompts)
        images = []
        for prompt, seed, negative, scale in zip(prompts, seeds, negatives, guidance):
            key = f"{prompt}|{seed}|{negative}|{scale}|{steps}|{sampler}".encode()
            digest = hashlib.sha256(key).digest()
            image = Image.new("RGB", (width, height), tuple(digest[:3]))
            image.paste(tuple(digest[3:6]), (0, 0, width // 2, height // 2))
            images.append(image)
        return images


@pytest.fixture
def fake_pipeline() -> FakePipeline:
    return FakePipeline()
