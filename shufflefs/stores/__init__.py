"""Stores by URL scheme, imported lazily so an optional client library is needed only when used."""

from __future__ import annotations

import importlib
import urllib.parse

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
)

__all__ = [
    "ABSENT",
    "Listing",
    "ObjectInfo",
    "ObjectMissing",
    "PreconditionFailed",
    "Store",
    "StoreError",
    "Unfinished",
    "UploadAborted",
    "check_endpoint_url",
    "open_store",
    "SCHEMES",
]

# scheme -> (module, class, what to install when the import fails)
SCHEMES = {
    "file": ("shufflefs.stores.file", "FileStore", None),
    "s3": ("shufflefs.stores.s3", "S3Store", "pip install boto3"),
    "memory": ("shufflefs.stores.memory", "MemoryStore", None),
    "daos": (
        "shufflefs.stores.daos",
        "DAOSStore",
        "it is not on PyPI; install the DAOS client (package daos-client, which puts pydaos in the "
        "system Python) or run `pip install <daos-prefix>/lib/daos/python` in this environment; see "
        "README 'Deploying on DAOS'",
    ),
}


def check_endpoint_url(url: str, what: str = "the S3 endpoint URL") -> None:
    """Refuse a URL with credentials (user:password@host): it is passed on the daemon's
    command line, which `ps` shows to every user. The message never repeats the URL."""
    # the authority by hand: urlsplit raises on some malformed URLs, and a URL without `//`
    # (user:secret@host:9000) would otherwise slip through as a scheme and a path
    rest = url.partition("//")[2] if "//" in url else url
    if "@" in rest.split("/", 1)[0]:
        raise StoreError(
            f"{what} must not contain credentials (user:password@); the AWS credential chain "
            "provides them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, an instance role), "
            "the DAOS agent for daos://",
            transient=False,
        )


def local_store_dirs(url: str) -> list[str]:
    """The local directories a store URL names (file:// only), without opening any store."""
    return open_store(url).local_paths() if url.startswith("file:") else []


def open_store(url: str, *, s3_endpoint_url: str | None = None) -> Store:
    """Build the store for `url`; raise StoreError (not transient) with a one-line message when
    the URL is malformed or names an unsupported scheme."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise StoreError(f"malformed store URL {url!r}: {exc}", transient=False) from None
    if not parsed.scheme:
        raise StoreError(
            f"store URL {url!r} has no scheme; use file:///abs/dir, s3://bucket[/prefix], "
            "daos://pool/container or memory://",
            transient=False,
        )
    if parsed.scheme not in SCHEMES:
        raise StoreError(
            f"unsupported store URL scheme {parsed.scheme!r} in {url!r}; supported: "
            + ", ".join(f"{s}://" for s in SCHEMES),
            transient=False,
        )
    if parsed.query or parsed.fragment:
        raise StoreError(f"store URL {url!r} must not have a query or fragment", transient=False)
    module_name, class_name, install_hint = SCHEMES[parsed.scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name if exc.name and "." not in exc.name else f"{exc.name or '?'} ({exc})"
        raise StoreError(f"the {parsed.scheme}:// store needs {missing}: {install_hint}", transient=False) from None
    store_class = getattr(module, class_name)
    return store_class.from_url(parsed, s3_endpoint_url=s3_endpoint_url)


def open_user_store(url: str, s3_endpoint_url: str | None = None) -> Store:
    """The store a user named on a command line (`ls`, `gc`): like open_store, after refusing
    credentials in either URL (StoreError, one line, never repeating the URL)."""
    check_endpoint_url(url, "the store URL")
    if s3_endpoint_url:
        check_endpoint_url(s3_endpoint_url)
    return open_store(url, s3_endpoint_url=s3_endpoint_url)
