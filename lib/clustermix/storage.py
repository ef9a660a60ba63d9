"""Object storage: the one place where the ``storage`` config becomes s3a, pyarrow, delta-rs and boto3 settings.

A lake or input on ``s3://`` is read and written by four clients: Spark (Hadoop's s3a), Ray Data and
the stages' own files (pyarrow's S3FileSystem), delta-rs (Rust object_store) and the run lock (boto3).
They must agree on the endpoint, the region, the addressing style and how often to retry, so every
one of them takes its settings from :func:`settings` here. Credentials are never config: every client
uses the AWS default chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, web identity, an
instance or pod role). Endpoint and region come from ``storage.endpoint``/``storage.region`` when set,
else from AWS_ENDPOINT_URL and AWS_REGION (or AWS_DEFAULT_REGION).

The settings are a value, never process state: :func:`settings` resolves a config's ``storage``
section into :class:`S3Settings`, a :class:`clustermix.lake.Lake` carries them (``lake.s3``), and
every helper that may open an ``s3://`` URI takes them as ``s3=``. A call on an ``s3://`` URI without
settings raises :class:`S3SettingsMissing` instead of guessing from the environment. Nothing here
writes ``os.environ``.

Commit safety on S3: the Spark stages commit through delta-spark 4.0.0 on s3a with
``S3SingleDriverLogStore``, whose put-if-absent holds within one driver only, so clustermix lets one
run (one driver) write a lake at a time: :class:`clustermix.lake.LakeLock` takes
``<lake.root>/_lock.json`` with an S3 conditional write (``If-None-Match: *``). The Ray stages commit
through delta-rs (:mod:`clustermix.deltars`), whose object_store commits with S3 conditional writes
(``If-None-Match``) and needs no lock table.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyarrow.fs import S3FileSystem

    from clustermix.config import StorageConfig

S3_SCHEMES = ("s3://", "s3a://")
# The credentials chain s3a uses: environment, system properties, web identity (EKS IRSA), profile,
# container and instance roles: the same sources as pyarrow, delta-rs and boto3.
DEFAULT_SPARK_CREDENTIALS = "software.amazon.awssdk.auth.credentials.DefaultCredentialsProvider"


class S3SettingsMissing(TypeError):
    """An ``s3://`` URI was opened with no :class:`S3Settings`: a caller forgot to pass ``s3=``
    (``lake.s3``, or :func:`settings` of the config's ``storage`` section)."""


@dataclass(frozen=True)
class S3Settings:
    """What every S3 client of the process uses (no secrets here)."""

    endpoint: str | None
    region: str | None
    path_style: bool
    retries: int
    connect_timeout_s: float
    request_timeout_s: float
    spark_credentials_provider: str

    @property
    def allow_http(self) -> bool:
        return bool(self.endpoint and self.endpoint.startswith("http://"))


def settings(given: StorageConfig | None = None) -> S3Settings:
    """S3 settings from the ``storage`` section ``given`` where it says something, else from the AWS
    env (read, never written). ``None``: the defaults, as an empty ``storage`` section."""
    from clustermix.config import StorageConfig

    cfg = given if given is not None else StorageConfig()
    endpoint = cfg.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    # S3-compatible servers (MinIO, Ceph, moto) want path-style URLs; AWS wants virtual-hosted ones
    path_style = cfg.path_style if cfg.path_style is not None else endpoint is not None
    return S3Settings(endpoint=endpoint.rstrip("/") if endpoint else None, region=region, path_style=path_style,
                      retries=cfg.retries, connect_timeout_s=cfg.connect_timeout_s,
                      request_timeout_s=cfg.request_timeout_s,
                      spark_credentials_provider=cfg.spark_credentials_provider or DEFAULT_SPARK_CREDENTIALS)


def is_s3(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith(S3_SCHEMES)


def bucket_key(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key.strip("/")


def require(uri: str, s3: S3Settings | None) -> S3Settings:
    """``s3``, which a call on the ``s3://`` URI ``uri`` needs: :class:`S3SettingsMissing` when None."""
    if s3 is None:
        raise S3SettingsMissing(
            f"{uri} is on S3 but no S3 settings were passed (s3=None): pass the lake's (lake.s3) or "
            "clustermix.storage.settings(cfg.storage); clustermix never falls back to process-wide settings")
    return s3


def pyarrow_fs(s3: S3Settings | None, uri: str = "s3://") -> S3FileSystem:
    """pyarrow's S3 filesystem with the settings ``s3`` (required) and their retry strategy. Code on
    a Ray worker is handed the driver's settings: a worker has none of its own."""
    return _pyarrow_fs(require(uri, s3))


@functools.lru_cache(maxsize=8)
def _pyarrow_fs(s: S3Settings) -> S3FileSystem:
    from pyarrow import fs as pafs

    kwargs: dict[str, Any] = {
        "region": s.region,
        "connect_timeout": s.connect_timeout_s,
        "request_timeout": s.request_timeout_s,
        # retries of throttling, 5xx and network errors, with backoff (the SDK's standard strategy)
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=s.retries + 1),
        "force_virtual_addressing": not s.path_style,
    }
    if s.endpoint:
        scheme, _, host = s.endpoint.partition("://")
        kwargs.update(endpoint_override=host, scheme=scheme)
    return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})


def delta_options(uri: str, s3: S3Settings | None) -> dict[str, str]:
    """delta-rs ``storage_options`` for the table at ``uri`` (empty for a local path), from the
    settings ``s3`` (required for an ``s3://`` URI)."""
    if not is_s3(uri):
        return {}
    s = require(uri, s3)
    opts = {
        "max_retries": str(s.retries),  # object_store retries 5xx, 429 and connection errors with backoff
        "retry_timeout": f"{max(30, int(s.request_timeout_s * (s.retries + 1)))}s",
        "timeout": f"{int(s.request_timeout_s)}s",
        "connect_timeout": f"{int(s.connect_timeout_s)}s",
    }
    if s.endpoint:
        opts["AWS_ENDPOINT_URL"] = s.endpoint
    if s.region:
        opts["AWS_REGION"] = s.region
    if s.allow_http:
        opts["AWS_ALLOW_HTTP"] = "true"
    opts["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "false" if s.path_style else "true"
    return opts


def spark_conf(given: StorageConfig) -> dict[str, str]:
    """Spark/Hadoop settings for s3a (``s3://`` URIs are served by s3a too), and Delta's S3 LogStore."""
    s = settings(given)
    h = "spark.hadoop.fs.s3a."
    conf = {
        "spark.hadoop.fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "spark.hadoop.fs.AbstractFileSystem.s3.impl": "org.apache.hadoop.fs.s3a.S3A",
        h + "aws.credentials.provider": s.spark_credentials_provider,
        h + "path.style.access": str(s.path_style).lower(),
        h + "attempts.maximum": str(s.retries),  # the AWS SDK's own retries of one request
        h + "retry.limit": str(s.retries),  # s3a's retries around whole operations
        h + "connection.establish.timeout": f"{int(s.connect_timeout_s * 1000)}ms",
        h + "connection.request.timeout": f"{int(s.request_timeout_s * 1000)}ms",
        # Delta's commit protocol on S3: put-if-absent within this driver; LakeLock keeps it the only one
        "spark.delta.logStore.s3.impl": "io.delta.storage.S3SingleDriverLogStore",
        "spark.delta.logStore.s3a.impl": "io.delta.storage.S3SingleDriverLogStore",
    }
    if s.endpoint:
        conf[h + "endpoint"] = s.endpoint
        conf[h + "connection.ssl.enabled"] = str(not s.allow_http).lower()
    if s.region:
        conf[h + "endpoint.region"] = s.region
    return conf


def ray_env(given: StorageConfig) -> dict[str, str]:
    """The non-secret settings of the ``storage`` section ``given`` for the runtime_env of Ray workers
    on other machines (they read the AWS env there). The stages hand their workers the settings
    explicitly as well (``lake.s3``); this only keeps a worker's own AWS env consistent with them."""
    env = {}
    if given.endpoint:
        env["AWS_ENDPOINT_URL"] = given.endpoint
    if given.region:
        env["AWS_REGION"] = given.region
    if settings(given).allow_http:
        env["AWS_ALLOW_HTTP"] = "true"  # delta-rs refuses http:// endpoints without it
    return env


def boto3_client(s3: S3Settings | None, service: str = "s3") -> Any:
    """A boto3 client with the settings ``s3`` (required; the run lock's conditional writes)."""
    return _boto3_client(service, require(f"{service}://", s3))


@functools.lru_cache(maxsize=8)
def _boto3_client(service: str, s: S3Settings) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    conf = BotoConfig(
        retries={"max_attempts": s.retries + 1, "mode": "standard"},
        connect_timeout=s.connect_timeout_s,
        read_timeout=s.request_timeout_s,
        s3={"addressing_style": "path" if s.path_style else "virtual"},
    )
    return boto3.client(service, endpoint_url=s.endpoint, region_name=s.region or "us-east-1", config=conf)


def describe(exc: BaseException) -> str:
    """One line saying what went wrong with an object-store request."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and response.get("Error"):
        err = response["Error"]
        return f"{err.get('Code', '')}: {err.get('Message', '')}".strip(": ")
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(((response or {}).get("Error") or {}).get("Code", "")) if isinstance(response, dict) else ""


# S3 answers these when a conditional write loses: the object exists / changed, or a concurrent
# conditional write to the same key is in flight
_PRECONDITION = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


def _storage_error(uri: str, exc: BaseException) -> Exception:
    from clustermix.errors import StorageError

    return StorageError(f"object store refused {uri}: {describe(exc)} (check the bucket, the credentials "
                        f"and storage.endpoint/AWS_ENDPOINT_URL)")


def read_json_object(uri: str, *, s3: S3Settings | None) -> tuple[dict[str, Any], str] | None:
    """The JSON object at ``uri`` and its ETag, or None when there is none."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = bucket_key(uri)
    try:
        obj = boto3_client(require(uri, s3)).get_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _error_code(exc) in {"NoSuchKey", "404"}:
            return None
        raise _storage_error(uri, exc) from None
    except BotoCoreError as exc:
        raise _storage_error(uri, exc) from None
    try:
        doc = json.loads(obj["Body"].read() or b"{}")
    except ValueError:
        doc = {}
    return (doc if isinstance(doc, dict) else {}), str(obj.get("ETag", ""))


def put_json_if(uri: str, doc: dict[str, Any], *, s3: S3Settings | None, absent: bool = True,
                etag: str | None = None) -> bool:
    """Write ``doc`` at ``uri`` only if no object is there (``If-None-Match: *``) or only if the object
    there still has ``etag`` (``If-Match``): S3's conditional writes, atomic on the server. False
    when the condition failed (someone else wrote first); :class:`StorageError` on a permanent error."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = bucket_key(uri)
    cond = {"IfMatch": etag} if etag is not None else ({"IfNoneMatch": "*"} if absent else {})
    try:
        boto3_client(require(uri, s3)).put_object(Bucket=bucket, Key=key, Body=json.dumps(doc).encode(),
                                  ContentType="application/json", **cond)
    except ClientError as exc:
        if _error_code(exc) in _PRECONDITION:
            return False
        raise _storage_error(uri, exc) from None
    except BotoCoreError as exc:
        raise _storage_error(uri, exc) from None
    return True


def delete_object(uri: str, *, s3: S3Settings | None) -> None:
    """Remove the object at ``uri`` (no error when it is gone)."""
    bucket, key = bucket_key(uri)
    boto3_client(require(uri, s3)).delete_object(Bucket=bucket, Key=key)
