"""moto's S3 server on 127.0.0.1 for tests of the S3 blob store (a real S3 API, not a mock of our code)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from server.settings import S3Settings

MiB = 1024 * 1024
REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret-do-not-log"  # moto accepts any credentials; this one must never show in messages


@dataclass
class Moto:
    endpoint: str
    client: Any  # a boto3 S3 client, for setting up buckets and inspecting what the store wrote

    def new_bucket(self) -> str:
        name = f"hounsfield-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    try:
        yield Moto(endpoint, client)
    finally:
        client.close()
        server.stop()


def s3_settings(moto: Moto, bucket: str, prefix: str = "") -> S3Settings:
    return S3Settings(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=moto.endpoint,
        region=REGION,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        multipart_threshold=5 * MiB,  # S3's minimum part size, so a modest file exercises multipart
    )
