"""URLs of object stores: which strings are URLs, the fsspec filesystem for one, and how to print one safely.

Credentials come from where the store's library looks (environment, including ``AWS_ENDPOINT_URL``; profiles;
a watch's ``storage_options``). They are never logged: :func:`redact` drops user info and query strings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ckptd.errors import ConfigError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
LOCAL_SCHEMES = ("file", "local")
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # pip install 'ckptd[<extra>]'


def scheme(text: str) -> str | None:
    """The URL scheme of ``text`` (``s3``, ``gs``, ``file`` …), or None for a plain path."""
    m = _SCHEME.match(text)
    return m.group(1).lower() if m else None


def is_remote(text: str | Any) -> bool:
    """True for an object-store URL (``s3://``, ``gs://`` …); False for a plain path or ``file://``."""
    return isinstance(text, str) and scheme(text) not in (None, *LOCAL_SCHEMES)


def local_path(text: str) -> str:
    """A ``file://`` URL as a plain path (anything else unchanged)."""
    if scheme(text) in LOCAL_SCHEMES:
        return urlsplit(text).path
    return text


def redact(url: str) -> str:
    """The URL without credentials or query string (for logs, status and manifests)."""
    if scheme(url) is None:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def join(url: str, *names: str) -> str:
    """``url/name/...`` without doubled slashes."""
    out = url.rstrip("/")
    for name in names:
        out = f"{out}/{name.strip('/')}"
    return out


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path inside it (``bucket/prefix`` for S3).

    A missing optional package becomes a :class:`ConfigError` naming the extra to install."""
    import fsspec  # imported here: status/history/check must stay fast and never need it

    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        extra = EXTRAS.get(scheme(url) or "", "s3")
        raise ConfigError(redact(url), [f"the object-store support is not installed ({exc}); "
                                        f"install it with: pip install 'ckptd[{extra}]'"]) from None
    except ValueError as exc:
        raise ConfigError(redact(url), [f"not a usable object-store URL ({exc})"]) from None
    return fs, path.rstrip("/")
