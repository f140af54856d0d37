"""Publishes a built repository to S3-compatible storage under ``s3://bucket/prefix/``:
``versions/<digest>/`` (the tree; the digest covers every file's path and bytes, so a version is
never rewritten), ``versions/<digest>.json`` (its record, written once every object is verified),
then ``current.json`` (the pointer, written last). A killed upload has no record and nothing points
at it; the next run finishes it. tritonserver is given ``versions/<digest>/`` itself.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import BuildError

_URL = re.compile(r"^s3://(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(?P<prefix>.*?))?/?$")


@dataclass(frozen=True)
class LocalFile:
    key: str  # path inside the repository, "/"-separated
    path: Path
    size: int
    sha256: str
    md5: str  # an S3 ETag for a single-part upload


@dataclass(frozen=True)
class Published:
    version: str
    uri: str  # s3://bucket/prefix/versions/<version>/
    triton_url: str  # what --model-repository takes (with the endpoint for a non-AWS store)
    uploaded: int
    kept: int  # already there, verified

    def summary(self) -> str:
        return (f"published version {self.version}: {self.uploaded} files uploaded, {self.kept} already there, all verified; "
                f"serve with tritonserver --model-repository={self.triton_url}")


def publish(repository: Path, url: str, endpoint_url: str | None = None, client: Any = None) -> Published:
    bucket, prefix = _parse(url)
    files = repository_files(repository)
    version = _version(files)
    base = f"{prefix}/versions/{version}/" if prefix else f"versions/{version}/"
    record_key = base.rstrip("/") + ".json"
    s3 = client or _client(endpoint_url)
    with _readable_errors(url, endpoint_url):
        s3.head_bucket(Bucket=bucket)
        present = _listing(s3, bucket, base)
        uploaded = 0
        for file in files:
            if not _same(s3, bucket, base + file.key, file, present):
                s3.upload_file(str(file.path), bucket, base + file.key, ExtraArgs={"Metadata": {"sha256": file.sha256}})
                uploaded += 1
        _verify(s3, bucket, base, files)
        record = {"version": version, "files": {f.key: {"size": f.size, "sha256": f.sha256} for f in files}}
        s3.put_object(Bucket=bucket, Key=record_key, Body=json.dumps(record, indent=1).encode())
        uri = f"s3://{bucket}/{base}"
        triton_url = f"s3://{endpoint_url.rstrip('/')}/{bucket}/{base.rstrip('/')}" if endpoint_url else uri.rstrip("/")
        pointer = {"version": version, "uri": uri, "model_repository": triton_url}
        s3.put_object(Bucket=bucket, Key=f"{prefix}/current.json" if prefix else "current.json",
                      Body=json.dumps(pointer, indent=1).encode())
    return Published(version, uri, triton_url, uploaded, len(files) - uploaded)


def current(url: str, endpoint_url: str | None = None, client: Any = None) -> dict[str, str] | None:
    """The pointer ``publish`` wrote last, or None."""
    bucket, prefix = _parse(url)
    s3 = client or _client(endpoint_url)
    with _readable_errors(url, endpoint_url):
        try:
            body = s3.get_object(Bucket=bucket, Key=f"{prefix}/current.json" if prefix else "current.json")["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None
    return json.loads(body)


def repository_files(repository: Path) -> list[LocalFile]:
    if not (repository / "manifest.json").is_file():
        raise BuildError(f"{repository}: not a built repository (no manifest.json); run `make engines` first")
    return [_describe(repository, path) for path in sorted(repository.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts]


def _describe(root: Path, path: Path) -> LocalFile:
    sha, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324 - md5 only to compare with S3's ETag
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
            md5.update(block)
    return LocalFile(path.relative_to(root).as_posix(), path, path.stat().st_size, sha.hexdigest(), md5.hexdigest())


def _version(files: list[LocalFile]) -> str:
    return hashlib.sha256("".join(f"{f.key}\0{f.sha256}\n" for f in files).encode()).hexdigest()[:16]


def _parse(url: str) -> tuple[str, str]:
    match = _URL.match(url)
    if not match:
        raise BuildError(f"{url}: expected s3://bucket/prefix")
    return match["bucket"], (match["prefix"] or "").strip("/")


def _client(endpoint_url: str | None) -> Any:
    try:
        import boto3
    except ImportError:
        raise BuildError("publishing to S3 needs boto3: pip install -e '.[s3]'") from None
    return boto3.client("s3", endpoint_url=endpoint_url)


def _listing(s3: Any, bucket: str, base: str) -> dict[str, int]:
    return {item["Key"]: item["Size"] for item in _objects(s3, bucket, base)}


def _objects(s3: Any, bucket: str, base: str) -> Iterator[dict[str, Any]]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
        yield from page.get("Contents", [])


def _same(s3: Any, bucket: str, key: str, file: LocalFile, present: dict[str, int]) -> bool:
    """Already uploaded with these bytes (a resumed upload skips it)."""
    if present.get(key) != file.size:
        return False
    return s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get("sha256") == file.sha256


def _verify(s3: Any, bucket: str, base: str, files: list[LocalFile]) -> None:
    """Every file there, no other, each of its size, with its sha256 and (single-part uploads) its MD5 as ETag."""
    listed = {item["Key"][len(base):]: item for item in _objects(s3, bucket, base)}
    expected = {f.key: f for f in files}
    if set(listed) != set(expected):
        extra, missing = sorted(set(listed) - set(expected)), sorted(set(expected) - set(listed))
        raise BuildError(f"s3://{bucket}/{base}: verification failed (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, file in expected.items():
        head = s3.head_object(Bucket=bucket, Key=base + key)
        etag = head["ETag"].strip('"')
        if (head["ContentLength"] != file.size or head.get("Metadata", {}).get("sha256") != file.sha256
                or ("-" not in etag and etag != file.md5)):
            raise BuildError(f"s3://{bucket}/{base}{key}: verification failed (size or hash differs from {file.path})")


class _readable_errors:
    """botocore's errors as one line: the URL and what is wrong."""

    def __init__(self, url: str, endpoint_url: str | None) -> None:
        self.where = url + (f" at {endpoint_url}" if endpoint_url else "")

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, _: Any) -> bool:
        if exc is None or isinstance(exc, BuildError):
            return False
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            raise BuildError(f"{self.where}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)") from None
        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            reason = {"InvalidAccessKeyId": "the access key is not known to this store",
                      "SignatureDoesNotMatch": "the secret key is wrong", "AccessDenied": "access denied",
                      "403": "access denied (wrong credentials?)", "NoSuchBucket": "no such bucket",
                      "404": "no such bucket"}.get(code, f"{code}: {exc}")
            raise BuildError(f"{self.where}: {reason}") from None
        if isinstance(exc, BotoCoreError):
            raise BuildError(f"{self.where}: {exc}") from None
        return False
