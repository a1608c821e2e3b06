"""A real S3 server on loopback for tests: moto's server mode (the dev extra installs it),
started on a free port of 127.0.0.1 in its own process and stopped at the end."""

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

from rskdist.comm import free_port

# What a client needs to reach the loopback server: the standard AWS variables only.
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "rsk-test-key-1c9e", "AWS_SECRET_ACCESS_KEY": "rsk-test-secret-7f3a",
                    "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self, log_path, *, check_credentials: bool = False):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        self._log = open(log_path, "w")
        # moto checks credentials (against its own IAM) only when asked to.
        env = dict(os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if check_credentials else {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except urllib.error.HTTPError:  # it answers (403 when it checks credentials)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on port {self.port}: see {log_path}")
                time.sleep(0.1)

    def make_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **_client_credentials()).create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _client_credentials() -> dict:
    return {"aws_access_key_id": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": FAKE_CREDENTIALS["AWS_DEFAULT_REGION"]}


@contextmanager
def s3_environment(server: S3Server):
    """This process's AWS variables pointed at `server` for the block (subprocesses inherit them)."""
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
