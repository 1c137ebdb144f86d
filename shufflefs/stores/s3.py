"""A store in an S3 bucket (AWS or any S3-compatible server): `s3://bucket[/prefix]`.

One boto3 client per store, created once and shared by all worker threads (boto3 clients are
thread-safe). botocore's own retries are off: every method is one attempt (the parts of a
multipart upload excepted, see below), and its failure is classified as transient (connection
trouble, timeouts, 5xx, throttling) or not (access denied, missing bucket, no credentials,
other 4xx), because the caller owns retries.

Files at or above `multipart_threshold` are uploaded in parts, checking the abort event before
each part (and while the bytes stream). A part that fails transiently is sent again within the
same multipart upload (`part_attempts`, backoff from `part_retry_delay`, cut short by the abort
event): restarting the whole upload for one bad part may never finish a large file on a flaky
link (a 256 MiB file with 10% of its parts failing was not stored after 27 whole attempts).
When a part fails for good or uses its attempts, or anything else fails, the multipart upload
is aborted, so an abandoned upload leaves neither an object nor a pending upload. Moves are
server-side copies (in parts above 5 GiB) followed by a delete.

Credentials come from the standard AWS chain (environment, profile, instance role, ...) and
never appear in messages or logs.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import re
import stat
import threading
import time
import urllib.parse

import boto3
import botocore.config
import botocore.exceptions

from shufflefs.stores import check_endpoint_url
from shufflefs.stores.base import (
    ABSENT,
    Listing,
    ObjectInfo,
    ObjectMissing,
    PreconditionFailed,
    Store,
    StoreError,
    Unfinished,
    UploadAborted,
    is_utf8,
    join_key,
)

# botocore logs request details (and, at DEBUG, signed headers) through these loggers
for _name in ("botocore", "boto3", "urllib3", "s3transfer"):
    logging.getLogger(_name).setLevel(logging.WARNING)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
MAX_PARTS = 10000
#: S3's limit for a single CopyObject; larger objects are copied with UploadPartCopy
COPY_OBJECT_LIMIT = 5 * GiB
DELETE_BATCH = 1000
#: user metadata (x-amz-meta-shufflefs-token) naming the write that stored an object
TOKEN_METADATA = "shufflefs-token"
#: S3's limit on a key, in UTF-8 bytes, the URL's prefix included
MAX_KEY_BYTES = 1024
#: characters a name must not hold: backslash, which SeaweedFS turns into '/' (so `a\b/x` would
#: be the object of `a/b/x`) and refuses after '..'; and control characters, U+FFFE and U+FFFF:
#: DeleteObjects sends keys in an XML body, XML 1.0 cannot carry them, and SeaweedFS answers
#: MalformedXML for the whole batch (tab, LF and CR are XML, but XML parsers turn CR into LF)
_REFUSED_IN_NAMES = re.compile(r"[\\\x00-\x1f\ufffe\uffff]")

# error codes worth retrying even though their HTTP status is a 4xx (or absent)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "IDPCommunicationError",
        "ConditionalRequestConflict",  # AWS: a concurrent conditional write on the key; try again
    }
)
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "Forbidden",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidSecurity",
    }
)
_CREDENTIAL_ERRORS = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
)
# raised while sending or receiving bytes: the request may or may not have happened
_CONNECTION_ERRORS = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
)


class _Aborted(Exception):
    """Raised from inside a request body's read() to stop an upload mid-stream."""


class _LocalReadError(Exception):
    """Raised from inside a request body's read() when reading the local file fails (or it got
    shorter), so it is not mistaken for a network error."""

    def __init__(self, error: OSError | None):
        super().__init__(str(error) if error else "the local file shrank during the upload")
        self.error = error


def _write_conditions(expect: str | None) -> dict:
    """The request arguments that make a write happen only if the key is as expected."""
    if expect is None:
        return {}
    return {"IfNoneMatch": "*"} if expect == ABSENT else {"IfMatch": expect}


def _token_metadata(token: str | None) -> dict:
    return {"Metadata": {TOKEN_METADATA: token}} if token else {}


class S3Store(Store):
    conditional = True
    #: size of upload parts (grows for files that would need more than 10000 parts)
    part_size = 8 * MiB
    #: attempts at each part of a multipart upload before the upload is given up (and aborted)
    part_attempts = 5
    #: seconds before a failed part is sent again; doubles with each attempt (0.2 + 0.4 + 0.8
    #: + 1.6 s at most per part with 5 attempts)
    part_retry_delay = 0.2
    #: size of the ranges copied by UploadPartCopy for objects too big for one CopyObject
    copy_part_size = 512 * MiB

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.max_key_bytes = MAX_KEY_BYTES - (len(self.prefix.encode()) + 1 if self.prefix else 0)
        session = boto3.session.Session()
        region = session.region_name or "us-east-1"
        config = botocore.config.Config(
            s3={"addressing_style": "path"},
            # one attempt per call: the caller owns retries ('max_attempts' here would count
            # retries, not attempts, so {'max_attempts': 1} means two tries)
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=32,
        )
        try:
            self._client = session.client("s3", endpoint_url=endpoint_url or None, region_name=region, config=config)
        except ValueError as exc:  # botocore: "Invalid endpoint: ..."
            raise StoreError(
                f"invalid S3 endpoint URL {_redact_url(endpoint_url or '')!r}: {_one_line(str(exc))}", transient=False
            ) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreError(f"cannot set up the S3 client: {_one_line(str(exc))}", transient=False) from None
        self.region = region
        #: the endpoint actually used, for messages (never contains credentials)
        self.endpoint = _redact_url(self._client.meta.endpoint_url)
        # whether botocore adds CRC32 checksums to uploads (AWS_REQUEST_CHECKSUM_CALCULATION);
        # multipart uploads then have to declare and repeat the checksums of their parts. Keep
        # them even over http, where SigV4 also hashes the body: without the checksum SeaweedFS
        # stored an empty object for a PUT cut short by a SIGKILL of the daemon
        # (test_sigkill_recovery_completes_pending_uploads)
        self._part_checksums = (
            getattr(self._client.meta.config, "request_checksum_calculation", None) == "when_supported"
        )

    @classmethod
    def from_url(cls, parsed: urllib.parse.SplitResult, s3_endpoint_url: str | None = None, **_options) -> S3Store:
        bucket = parsed.netloc
        if not bucket:
            raise StoreError("s3:// store URL needs a bucket: s3://bucket[/prefix]", transient=False)
        if "@" in bucket:  # never echo it: it may hold credentials
            raise StoreError(
                "s3:// store URL must not contain credentials; use AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or a profile",
                transient=False,
            )
        if ":" in bucket:
            raise StoreError(
                f"s3:// store URL has an invalid bucket name {bucket!r}; set the endpoint "
                "with --s3-endpoint-url or AWS_ENDPOINT_URL",
                transient=False,
            )
        prefix = urllib.parse.unquote(parsed.path).strip("/")
        endpoint = (
            s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        if endpoint:
            check_endpoint_url(endpoint)
        return cls(bucket, prefix, endpoint)

    def name_error(self, name):
        # keys are UTF-8 (boto3 could not even send the others)
        if not is_utf8(name) or _REFUSED_IN_NAMES.search(name):
            return errno.EINVAL
        return None

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # best effort: only releases pooled connections
            pass

    # -- helpers -------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def _where(self, full_key: str) -> str:
        return f"s3://{self.bucket}/{full_key}"

    def _error(self, exc: BaseException, what: str, key: str | None = None) -> StoreError:
        """Map a botocore (or local file) exception to a one-line StoreError; a failed
        condition of a write to `key` becomes PreconditionFailed."""
        if isinstance(exc, StoreError):
            return exc
        if (
            key is not None
            and isinstance(exc, botocore.exceptions.ClientError)
            and _client_error_parts(exc)[0] in _PRECONDITION_CODES
        ):
            return PreconditionFailed(key)
        local = next((e for e in _exception_chain(exc) if isinstance(e, _LocalReadError)), None)
        if local is not None:
            exc = local.error if local.error is not None else local
            if not isinstance(exc, OSError):
                return StoreError(f"{what}: the local file shrank during the upload", transient=True)
        if isinstance(exc, _CREDENTIAL_ERRORS):
            return StoreError(f"{what}: {_NO_CREDENTIALS}", transient=False)
        if isinstance(exc, botocore.exceptions.ClientError):
            code, status, message = _client_error_parts(exc)
            text = f"{what}: {code}" + (f" ({message})" if message and message != code else "")
            return StoreError(text, transient=_is_transient(code, status))
        if isinstance(exc, _CONNECTION_ERRORS):
            return StoreError(
                f"{what}: cannot reach S3 endpoint {self.endpoint}: {_connection_reason(exc)}", transient=True
            )
        if isinstance(exc, botocore.exceptions.ParamValidationError):
            return StoreError(f"{what}: {_one_line(str(exc))}", transient=False)
        if isinstance(exc, OSError):  # the local file being uploaded
            transient = exc.errno not in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR)
            return StoreError(f"{what}: local file: {exc.strerror or exc}", transient=transient)
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return StoreError(f"{what}: {_one_line(str(exc))}", transient=True)
        return StoreError(f"{what}: {type(exc).__name__}: {_one_line(str(exc))}", transient=True)

    # -- Store interface -----------------------------------------------------------------------

    def check(self) -> None:
        bucket = self.bucket
        try:
            self._client.head_bucket(Bucket=bucket)
        except _CREDENTIAL_ERRORS:
            raise StoreError(_NO_CREDENTIALS, transient=False) from None
        except _CONNECTION_ERRORS as exc:
            raise StoreError(
                f"cannot reach S3 endpoint {self.endpoint}: {_connection_reason(exc)}", transient=False
            ) from None
        except botocore.exceptions.ClientError as exc:
            code, status, message = _client_error_parts(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                msg = f"bucket {bucket!r} does not exist at {self.endpoint}"
            elif code in _DENIED_CODES or status == 403:
                msg = f"access denied to bucket {bucket!r}: check the AWS credentials"
            elif status in (301, 307) or code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
                region = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
                msg = (
                    f"bucket {bucket!r} is in region {region}, not {self.region}: set AWS_DEFAULT_REGION={region}"
                    if region
                    else f"bucket {bucket!r} is not in region {self.region}: set AWS_DEFAULT_REGION"
                )
            else:  # e.g. 5xx or throttling: worth trying again later
                raise StoreError(
                    f"S3 bucket {bucket!r} at {self.endpoint} is not usable: {code}"
                    + (f" ({message})" if message and message != code else ""),
                    transient=_is_transient(code, status),
                ) from None
            raise StoreError(msg, transient=False) from None
        except botocore.exceptions.ParamValidationError as exc:
            raise StoreError(f"invalid S3 bucket name {bucket!r}: {_one_line(str(exc))}", transient=False) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreError(
                f"S3 bucket {bucket!r} at {self.endpoint} is not usable: {_one_line(str(exc))}", transient=False
            ) from None

    def put_file(self, key, path, abort=None, *, expect=None, token=None):
        full = self._key(key)
        what = f"uploading {self._where(full)}"
        if abort is not None and abort.is_set():
            raise UploadAborted(key)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise self._error(exc, what) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{what}: local path {path} is not a regular file", transient=False)
            size = st.st_size
            if size >= self.multipart_threshold:
                return self._put_multipart(key, full, fd, size, abort, what, expect, token)
            body = _FileSlice(fd, 0, size, abort)
            try:
                response = self._client.put_object(
                    Bucket=self.bucket,
                    Key=full,
                    Body=body,
                    ContentLength=size,
                    **_write_conditions(expect),
                    **_token_metadata(token),
                )
            except Exception as exc:
                if _is_abort(exc):
                    raise UploadAborted(key) from None
                raise self._error(exc, what, key) from None
            return response.get("ETag")
        finally:
            os.close(fd)

    def _multipart(self, full: str, send_parts, expect: str | None, **create_args) -> str | None:
        """Create a multipart upload at `full`, let send_parts(upload_id) send the parts and
        return their list, complete it (if the key is as expected) and return the ETag; on any
        failure abort it, so no upload is left behind."""
        upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=full, **create_args)["UploadId"]
        completed = False
        try:
            parts = send_parts(upload_id)
            response = self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **_write_conditions(expect),
            )
            completed = True
        finally:
            if not completed:
                self._abort_multipart(full, upload_id)
        return response.get("ETag")

    def _put_multipart(
        self, key: str, full: str, fd: int, size: int, abort, what: str, expect: str | None, token: str | None
    ) -> str | None:
        part_size = _part_size(size, self.part_size)
        extra = {"ChecksumAlgorithm": "CRC32"} if self._part_checksums else {}

        def send_parts(upload_id: str) -> list[dict]:
            parts = []
            for number, offset in enumerate(range(0, size, part_size), start=1):
                length = min(part_size, size - offset)
                response = self._upload_part(key, full, upload_id, number, fd, offset, length, abort, extra)
                part = {"ETag": response["ETag"], "PartNumber": number}
                if "ChecksumCRC32" in response and extra:
                    part["ChecksumCRC32"] = response["ChecksumCRC32"]
                parts.append(part)
            if abort is not None and abort.is_set():
                raise UploadAborted(key)
            return parts

        try:
            return self._multipart(full, send_parts, expect, **extra, **_token_metadata(token))
        except UploadAborted:
            raise
        except Exception as exc:
            raise self._error(exc, what, key) from None

    def _upload_part(
        self, key: str, full: str, upload_id: str, number: int, fd: int, offset: int, length: int, abort, extra: dict
    ) -> dict:
        """Send one part; a transient failure sends it again within the same upload, so a flaky
        link costs that part, not the whole file (which the caller would upload again). Sending
        a part number again replaces it with the same bytes, so an attempt that failed but was
        applied anyway (or is applied late) changes nothing."""
        what = f"uploading {self._where(full)}: part {number}"
        delay = self.part_retry_delay
        attempt = 1
        while True:
            if abort is not None and abort.is_set():
                raise UploadAborted(key)
            try:
                return self._client.upload_part(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=_FileSlice(fd, offset, length, abort),
                    ContentLength=length,
                    **extra,
                )
            except Exception as exc:
                if _is_abort(exc):
                    raise UploadAborted(key) from None
                error = self._error(exc, what)
                if not error.transient or attempt >= self.part_attempts:
                    raise error from None
            log.warning("%s (attempt %d of %d); sending the part again", error.args[0], attempt, self.part_attempts)
            if abort is None:
                time.sleep(delay)
            else:
                abort.wait(delay)  # cut short by an abort, which the next turn notices
            delay *= 2
            attempt += 1

    def _abort_multipart(self, full: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except Exception as exc:  # best effort; a bucket lifecycle rule should clean up the rest
            log.warning(
                "could not abort the multipart upload of %s: %s", self._where(full), self._error(exc, "abort").args[0]
            )

    def unfinished_writes(self):
        top = self._key("")
        start = top + "/" if top else ""
        found = []
        try:
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
                for upload in page.get("Uploads", ()):
                    found.append(
                        Unfinished(upload["Key"][len(start) :], _mtime_ns(upload["Initiated"]), upload["UploadId"])
                    )
        except Exception as exc:
            raise self._error(exc, f"listing the multipart uploads in {self._where(start)}") from None
        return found

    def abort_unfinished(self, write):
        full = self._key(write.key)
        what = f"aborting the multipart upload of {self._where(full)}"
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=write.handle)
        except botocore.exceptions.ClientError as exc:
            if _client_error_parts(exc)[0] != "NoSuchUpload":
                raise self._error(exc, what) from None
        except Exception as exc:
            raise self._error(exc, what) from None

    def get_range(self, key, offset, length, *, expect=None):
        full = self._key(key)
        what = f"reading {self._where(full)}"
        if length <= 0:
            info = self.head(key)
            if info is None:
                raise ObjectMissing(key)
            if expect is not None and info.version != expect:
                raise PreconditionFailed(key)
            return b""
        condition = {"IfMatch": expect} if expect is not None else {}
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes={offset}-{offset + length - 1}", **condition
            )
            with response["Body"] as body:
                data = body.read()
        except botocore.exceptions.ClientError as exc:
            code, _status, _message = _client_error_parts(exc)
            if code in ("InvalidRange", "416", "RequestedRangeNotSatisfiable"):
                return b""
            if code in _MISSING_KEY_CODES:
                raise ObjectMissing(key) from None
            raise self._error(exc, what, key) from None
        except Exception as exc:
            raise self._error(exc, what) from None
        if response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200 and "ContentRange" not in response:
            data = data[offset : offset + length]  # the server ignored the Range header
        return data[:length]

    def head(self, key):
        full = self._key(key)
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=full)
        except botocore.exceptions.ClientError as exc:
            if _client_error_parts(exc)[0] in _MISSING_KEY_CODES:
                return None
            raise self._error(exc, f"stat {self._where(full)}") from None
        except Exception as exc:
            raise self._error(exc, f"stat {self._where(full)}") from None
        return ObjectInfo(
            key.rsplit("/", 1)[-1],
            response["ContentLength"],
            _mtime_ns(response["LastModified"]),
            response.get("ETag"),
            (response.get("Metadata") or {}).get(TOKEN_METADATA),
        )

    def list_dir(self, prefix):
        full = self._key(prefix)
        start = full + "/" if full else ""
        dirs, files = set(), []
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=start, Delimiter="/"):
                for common in page.get("CommonPrefixes", ()):
                    name = common["Prefix"][len(start) :].rstrip("/")
                    if name and "/" not in name:
                        dirs.add(name)
                for obj in page.get("Contents", ()):
                    name = obj["Key"][len(start) :]
                    if name and "/" not in name:  # skip a 'dir/' marker object
                        files.append(ObjectInfo(name, obj["Size"], _mtime_ns(obj["LastModified"]), obj.get("ETag")))
        except Exception as exc:
            raise self._error(exc, f"listing {self._where(start)}") from None
        return Listing(sorted(dirs), sorted(files, key=lambda o: o.name))

    copies = True

    def move(self, src, dst, *, expect_src=None, expect_dst=None, token=None):
        src_full, dst_full = self._key(src), self._key(dst)
        what = f"moving {self._where(src_full)} to {self._where(dst_full)}"
        if src_full == dst_full:
            info = self.head(src)
            if info is None:
                raise ObjectMissing(src)
            return info.version
        version = self._copy_object(src, dst, what, expect_src, expect_dst, token)
        try:
            source_condition = {"IfMatch": expect_src} if expect_src not in (None, ABSENT) else {}
            self._client.delete_object(Bucket=self.bucket, Key=src_full, **source_condition)
        except Exception as exc:
            raise self._error(exc, f"{what}: deleting the source", src) from None
        return version

    def copy(self, src, dst, *, expect_src=None, expect_dst=None, token=None):
        what = f"copying {self._where(self._key(src))} to {self._where(self._key(dst))}"
        return self._copy_object(src, dst, what, expect_src, expect_dst, token)

    def _copy_object(
        self, src: str, dst: str, what: str, expect_src: str | None, expect_dst: str | None, token: str | None
    ) -> str | None:
        """CopyObject (UploadPartCopy above its limit) of one version of `src` to `dst`."""
        src_full, dst_full = self._key(src), self._key(dst)
        source = {"CopySourceIfMatch": expect_src} if expect_src not in (None, ABSENT) else {}
        metadata = {"MetadataDirective": "REPLACE", **_token_metadata(token)} if token else {}
        try:
            response = self._client.copy_object(
                Bucket=self.bucket,
                Key=dst_full,
                CopySource={"Bucket": self.bucket, "Key": src_full},
                **source,
                **_write_conditions(expect_dst),
                **metadata,
            )
            version = response.get("CopyObjectResult", {}).get("ETag")
        except botocore.exceptions.ClientError as exc:
            code = _client_error_parts(exc)[0]
            if code in _MISSING_KEY_CODES:
                raise ObjectMissing(src) from None
            if code not in ("InvalidRequest", "EntityTooLarge", "InvalidArgument"):
                raise self._error(exc, what, dst) from None
            info = self.head(src)  # too big for one CopyObject?
            if info is None:
                raise ObjectMissing(src) from None
            if info.size < COPY_OBJECT_LIMIT:
                raise self._error(exc, what) from None
            version = self._copy_in_parts(src_full, dst_full, info.size, what, expect_dst, token)
        except Exception as exc:
            raise self._error(exc, what, dst) from None
        if version and not version.startswith('"'):
            version = f'"{version}"'  # CopyObjectResult's ETag comes unquoted from some servers
        return version

    def _copy_in_parts(
        self, src_full: str, dst_full: str, size: int, what: str, expect: str | None, token: str | None
    ) -> str | None:
        """Copy an object server-side with UploadPartCopy (for objects above CopyObject's limit)."""
        part_size = _part_size(size, self.copy_part_size)

        def send_parts(upload_id: str) -> list[dict]:
            parts = []
            for number, offset in enumerate(range(0, size, part_size), start=1):
                last = min(offset + part_size, size) - 1
                response = self._client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=dst_full,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": src_full},
                    CopySourceRange=f"bytes={offset}-{last}",
                )
                parts.append({"ETag": response["CopyPartResult"]["ETag"], "PartNumber": number})
            return parts

        try:
            return self._multipart(dst_full, send_parts, expect, **_token_metadata(token))
        except botocore.exceptions.ClientError as exc:
            if _client_error_parts(exc)[0] in _MISSING_KEY_CODES:
                raise ObjectMissing(src_full[len(self.prefix) :].lstrip("/")) from None
            raise self._error(exc, what, dst_full[len(self.prefix) :].lstrip("/")) from None
        except Exception as exc:
            raise self._error(exc, what) from None

    def delete_many(self, keys, *, expect=None):
        keys = list(keys)
        expect = expect or {}
        by_full = {self._key(k): k for k in keys}
        failed = {}
        for start in range(0, len(keys), DELETE_BATCH):
            batch = []
            for key in keys[start : start + DELETE_BATCH]:
                version = expect.get(key)
                batch.append({"Key": self._key(key), **({"ETag": version} if version not in (None, ABSENT) else {})})
            what = f"deleting {len(batch)} objects in s3://{self.bucket}"
            try:
                response = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as exc:
                raise self._error(exc, what) from None
            for error in response.get("Errors", ()):
                code = error.get("Code", "")
                key = by_full.get(error.get("Key", ""), error.get("Key", ""))
                if code in _MISSING_KEY_CODES:
                    continue
                if code in _PRECONDITION_CODES:
                    failed[key] = PreconditionFailed(key)
                else:
                    failed[key] = StoreError(
                        f"deleting {self._where(self._key(key))}: {code}"
                        + (f" ({_one_line(error['Message'])})" if error.get("Message") else ""),
                        transient=_is_transient(code, None),
                    )
        return failed


class _FileSlice:
    """A seekable, read-only view of `length` bytes at `start` of an open file, used as a request
    body (botocore seeks it to compute checksums and to rewind). Reads check `abort`, so an
    upload can stop mid-stream: the exception ends the request and the half-sent body is dropped
    by the server. Once every byte was read, an abort is too late: the server has it all."""

    def __init__(self, fd: int, start: int, length: int, abort: threading.Event | None):
        self._fd = fd
        self._start = start
        self._length = length
        self._pos = 0
        self._abort = abort

    def read(self, size: int = -1) -> bytes:
        remaining = self._length - self._pos
        if size is None or size < 0 or size > remaining:
            size = remaining
        if size <= 0:
            # the whole body is out: the request stands, and its answer says what became of it
            # (an abort now would only lose that answer, not the write)
            return b""
        if self._abort is not None and self._abort.is_set():
            raise _Aborted()
        try:
            data = os.pread(self._fd, size, self._start + self._pos)
        except OSError as exc:
            raise _LocalReadError(exc) from exc
        if not data:
            raise _LocalReadError(None)
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._length + offset
        else:
            raise ValueError(f"bad whence {whence}")
        self._pos = max(0, min(pos, self._length))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:  # the caller owns the descriptor
        pass


_NO_CREDENTIALS = "no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"


def _part_size(size: int, minimum: int) -> int:
    """The part size for `size` bytes: at least `minimum`, in whole MiB, at most MAX_PARTS parts."""
    needed = -(-size // MAX_PARTS)
    needed = -(-needed // MiB) * MiB
    return max(minimum, needed)


def _client_error_parts(exc: botocore.exceptions.ClientError) -> tuple[str, int | None, str]:
    error = exc.response.get("Error", {}) or {}
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = str(error.get("Code") or status or "UnknownError")
    return code, status, _one_line(str(error.get("Message") or ""))


def _is_transient(code: str, status: int | None) -> bool:
    if code in _TRANSIENT_CODES:
        return True
    if status is None and code.isdigit():
        status = int(code)
    return status is not None and (status >= 500 or status in (408, 429))


def _is_abort(exc: BaseException) -> bool:
    """Whether `exc` comes from _FileSlice noticing the abort event (botocore wraps exceptions
    raised while sending a body in HTTPClientError)."""
    return any(isinstance(e, _Aborted) for e in _exception_chain(exc))


def _connection_reason(exc: BaseException) -> str:
    """A short reason for a connection-level failure, e.g. 'connection refused'."""
    text = " ".join(str(e) for e in _exception_chain(exc))
    if isinstance(exc, botocore.exceptions.ReadTimeoutError):
        return "read timed out"
    if isinstance(exc, botocore.exceptions.ConnectTimeoutError):
        return "connection timed out"
    lowered = text.lower()
    for needle, reason in (
        ("connection refused", "connection refused"),
        ("name or service not known", "host name not found"),
        ("nodename nor servname", "host name not found"),
        ("temporary failure in name resolution", "host name not found (DNS failure)"),
        ("no route to host", "no route to host"),
        ("network is unreachable", "network is unreachable"),
        ("connection reset", "connection reset by peer"),
        ("certificate verify failed", "TLS certificate verification failed"),
        ("timed out", "connection timed out"),
    ):
        if needle in lowered:
            return reason
    if isinstance(exc, botocore.exceptions.ConnectionClosedError):
        return "connection closed by the server"
    return _one_line(str(exc)) or type(exc).__name__


def _exception_chain(exc: BaseException):
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        kwargs = getattr(current, "kwargs", None)
        inner = kwargs.get("error") if isinstance(kwargs, dict) else None
        current = inner if isinstance(inner, BaseException) else (current.__cause__ or current.__context__)


def _mtime_ns(value) -> int:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        delta = value - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
        return (delta // datetime.timedelta(microseconds=1)) * 1000
    return int(value * 1e9)


def _redact_url(url: str) -> str:
    """The URL without any user:password part."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return url
    if parts.username is None and parts.password is None:
        return url
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def _one_line(text: str) -> str:
    return " ".join(text.split())
