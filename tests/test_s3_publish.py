"""`python -m builder publish` against a real S3 server on localhost (moto's server mode), and the real
tritonserver serving what was published, straight from s3://."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from builder.errors import BuildError
from builder.storage import s3 as storage
from builder.storage.s3 import current, publish
from tests.conftest import run_cli

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def moto_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, endpoint
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="module")
def endpoint():
    process, url = moto_server({})
    yield url
    process.kill()


@pytest.fixture()
def bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    name = f"models-{time.monotonic_ns()}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def test_publish_serve_from_s3_and_republish_nothing(built_repository: Path, bucket: str, endpoint: str,
                                                     tmp_path: Path) -> None:
    import tritonclient.grpc as grpcclient

    from builder.serve.client import Request, ask
    from builder.serve.tritonserver import TritonServer

    result = run_cli("publish", f"s3://{bucket}/tiny", "--endpoint-url", endpoint, "--repository", str(built_repository))
    assert result.returncode == 0, result.stderr
    pointer = current(f"s3://{bucket}/tiny", endpoint)
    assert f"--model-repository={pointer['model_repository']}" in result.stdout
    again = publish(built_repository, f"s3://{bucket}/tiny", endpoint)
    assert again.uploaded == 0 and again.version == pointer["version"]  # content-addressed: nothing new

    request = Request("What is in the picture?", max_tokens=6)
    with TritonServer(built_repository, log_path=tmp_path / "local.log") as local, \
            grpcclient.InferenceServerClient(local.grpc_url) as client:
        expected = ask(client, request).token_ids
    with TritonServer(pointer["model_repository"], log_path=tmp_path / "s3.log") as remote, \
            grpcclient.InferenceServerClient(remote.grpc_url) as client:
        assert ask(client, request).token_ids == expected


def test_an_upload_killed_halfway_leaves_the_previous_version_pointed_at(
        built_repository: Path, bucket: str, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"s3://{bucket}/tiny"
    first = publish(built_repository, url, endpoint)
    changed = tmp_path / "model_repository"
    shutil.copytree(built_repository, changed)
    (changed / "manifest.json").write_text((changed / "manifest.json").read_text() + "\n")  # another build

    real_upload, calls = storage._client(endpoint).upload_file, []

    def dies_after_five(*args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        calls.append(args)
        return real_upload(*args, **kwargs)

    client = storage._client(endpoint)
    monkeypatch.setattr(client, "upload_file", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        publish(changed, url, endpoint, client=client)
    assert current(url, endpoint)["version"] == first.version  # the pointer never moved to a half version
    finished = publish(changed, url, endpoint)  # the rerun uploads only what is missing
    assert finished.version != first.version and finished.kept == 5 and current(url, endpoint)["version"] == finished.version


def test_wrong_credentials_and_missing_buckets_are_one_line(built_repository: Path, endpoint: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    process, guarded = moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # this one checks every key
    try:
        for key, value in CREDENTIALS.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(BuildError, match=r"^s3://models/tiny at http://127\.0\.0\.1:\d+: access denied \(wrong credentials\?\)$"):
            publish(built_repository, "s3://models/tiny", guarded)
    finally:
        process.kill()
    result = run_cli("publish", "s3://no-such-bucket-here/x", "--endpoint-url", endpoint, "--repository", str(built_repository))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: s3://no-such")
    with pytest.raises(BuildError, match="not a built repository"):
        publish(tmp_path, "s3://models/x", endpoint)
    with pytest.raises(BuildError, match="expected s3://bucket/prefix"):
        publish(built_repository, "https://models/x", endpoint)
