"""A real S3 + SQS endpoint for tests: moto in server mode (``ThreadedMotoServer``) on 127.0.0.1.

Session-wide: one server; each test gets its own bucket (and queue) so tests stay independent. Clients reach it the
way users reach an S3-compatible store: ``AWS_ENDPOINT_URL`` and credentials in the environment (set for the test and
exported to subprocesses such as ``ckptd run``).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

_COUNTER = itertools.count()


@dataclass
class S3Endpoint:
    url: str  # http://127.0.0.1:PORT
    env: dict[str, str]  # what a client process needs (endpoint, fake credentials, region)

    def client(self, service: str = "s3") -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, prefix: str = "ckptd-test") -> str:
        """A new, empty bucket (valid S3 name)."""
        name = f"{prefix}-{os.getpid()}-{next(_COUNTER)}"
        self.client().create_bucket(Bucket=name)
        return name

    def queue_with_notifications(self, bucket: str) -> str:
        """An SQS queue receiving the bucket's ObjectCreated/ObjectRemoved notifications; returns its URL."""
        sqs = self.client("sqs")
        url = sqs.create_queue(QueueName=f"{bucket}-events")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.client().put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]})
        return url


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[test]')")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log lines in test output
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        yield S3Endpoint(url, env)
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """The session's S3 endpoint with its environment set for this test (s3fs and boto3 read it)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    import fsspec

    fsspec.config.conf.pop("s3", None)
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()  # no cached client from another test's environment
    return s3_server
