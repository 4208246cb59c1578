"""An S3 API that checks credentials and permissions: moto's server with IAM enforced.

moto's server accepts any key by default. Its IAM simulation is switched on by
``INITIAL_NO_AUTH_ACTION_COUNT`` (a count of requests served before checking starts); a
running server takes a new count at ``POST /moto-api/reset-auth`` (what moto's
``set_initial_no_auth_action_count`` does in server mode). Every request after that must be
signed with an access key of an IAM user (else ``InvalidAccessKeyId``), with its secret
(else ``SignatureDoesNotMatch``), and be allowed by that user's policies (else
``AccessDenied``).

The setting is global to the process that serves, and the session's ``s3_server`` (any key
accepted) runs in the test process: this server runs in a process of its own, started
as ``python iam_s3.py``. It prints its endpoint and serves until its standard input closes,
so it ends with the test process however that ends.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

READ = ["s3:Get*", "s3:List*", "s3:Head*"]   # moto checks HEAD bucket as s3:HeadBucket
# 'scoped' may list and read but not HEAD the bucket: on AWS, what s3:ListBucket allowed
# only under the store's prefix (an s3:prefix condition) gives
USERS = {"writer": ["s3:*"], "reader": READ, "nobody": None,
         "scoped": ["s3:List*", "s3:GetObject", "s3:HeadObject"]}
WRONG_SECRET = "actstore-wrong-secret-0d9a7c41"


@dataclass(frozen=True)
class IamS3:
    endpoint: str
    bucket: str
    keys: dict[str, tuple[str, str]]   # user -> (access key id, secret); 'wrong': bad secret

    def options(self, user: str) -> dict:
        """fsspec options for ``user``."""
        key, secret = self.keys[user]
        return {"key": key, "secret": secret,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def env(self, user: str) -> dict:
        """The standard AWS variables for ``user``, as a shell would export them."""
        key, secret = self.keys[user]
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def secrets(self) -> list[str]:
        return [secret for _, secret in self.keys.values()]


def _configure(endpoint: str) -> IamS3:
    """A bucket and three IAM users (read-write, read-only, no policy), then IAM enforced."""
    import boto3
    import requests

    setup = {"endpoint_url": endpoint, "region_name": "us-east-1",
             "aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
    bucket = f"iam-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", **setup).create_bucket(Bucket=bucket)
    iam, keys = boto3.client("iam", **setup), {}
    for user, actions in USERS.items():
        iam.create_user(UserName=user)
        if actions:
            iam.put_user_policy(UserName=user, PolicyName=f"{user}-{bucket}",
                                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                                    {"Effect": "Allow", "Action": actions,
                                     "Resource": [f"arn:aws:s3:::{bucket}",
                                                  f"arn:aws:s3:::{bucket}/*"]}]}))
        made = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (made["AccessKeyId"], made["SecretAccessKey"])
    keys["wrong"] = (keys["writer"][0], WRONG_SECRET)
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=30).raise_for_status()
    return IamS3(endpoint, bucket, keys)


@pytest.fixture(scope="module")
def iam_s3():
    """A moto S3 server of its own with IAM enforced: users writer, reader, nobody and
    'wrong' (the writer's key id with a wrong secret)."""
    pytest.importorskip("s3fs")
    proc = subprocess.Popen([sys.executable, str(Path(__file__))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://"), "moto server did not start"
        yield _configure(endpoint)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve() -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    _serve()
