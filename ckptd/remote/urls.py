"""URLs of object stores: which strings are URLs, the fsspec filesystem for one, and how to print one safely.

Credentials come from where the store's library looks (environment, including ``AWS_ENDPOINT_URL``; profiles;
a watch's ``storage_options``); a URL carrying user info is a config error (:func:`has_userinfo`). They are never
logged: :func:`redact` drops user info and query strings (and never raises), :func:`scrub` removes ``user:secret@``
from any text (an error message of botocore/s3fs that quotes an endpoint URL) before it reaches a log or the status.
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


# ``scheme://user:secret@`` (the secret may hold '/': an AWS secret key does) or ``scheme://token@``
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@:'\"]+(?::[^\s@'\"]*)?@")


def has_userinfo(url: str) -> bool:
    """Does the URL carry user info (``s3://KEY:SECRET@bucket``)? Also when the secret holds a '/', which makes
    the URL parse as ``KEY:SECRET-part`` with a port that is not a number and an '@' in the path."""
    rest = url.split("://", 1)[-1]
    netloc, _, path = rest.partition("/")
    if "@" in netloc:
        return True
    if ":" in netloc:
        port = netloc.rsplit(":", 1)[1]
        return not port.isdigit() or "@" in path
    return False


def redact(url: str) -> str:
    """The URL without credentials or query string (for logs, status and manifests). Never raises: a URL that
    cannot be parsed or that hides its user info in the path becomes ``<scheme>://<redacted>``."""
    name = scheme(url)
    if name is None:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:  # a port that is not a number: KEY:SECRET with a '/' in the secret
        return f"{name}://<redacted>"
    if ":" in parts.netloc.rpartition("@")[2] and "@" in parts.path:  # KEY:123/rest-of-secret@bucket
        return f"{name}://<redacted>"
    if port:
        host = f"{host}:{port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def scrub(text: str) -> str:
    """``text`` with the user info of every URL in it replaced (``s3://<redacted>@bucket``): for error messages of
    the store's libraries, which may quote an endpoint or object URL, before a log line or the status gets them."""
    return _USERINFO.sub(r"\g<scheme><redacted>@", text)


def static_prefix(template: str, watch: str = "") -> str:
    """What every URL an output template resolves to starts with: ``{watch}`` filled in, cut at the first other
    placeholder; the scheme normalised (``s3a`` is ``s3``) and the bucket lower-cased (S3 names are)."""
    text = template.replace("{watch}", watch) if watch else template
    return _normal(text.split("{", 1)[0])


def under(url: str, prefix: str) -> bool:
    """Is every object of ``url`` (a run's ``s3://bucket/prefix``) a key starting with ``prefix`` (an output's
    :func:`static_prefix`)? Object stores compare keys as strings, so ``s3://b/out-x`` is under ``s3://b/out-``."""
    return (_normal(url).rstrip("/") + "/").startswith(_normal(prefix))


def overlap(a: str, b: str) -> bool:
    """Can a key start with both static prefixes (one is a string prefix of the other)?"""
    a, b = _normal(a), _normal(b)
    return a.startswith(b) or b.startswith(a)


def _normal(url: str) -> str:
    name = scheme(url)
    if name is None:
        return url
    rest = url.split("://", 1)[1]
    bucket, sep, key = rest.partition("/")
    return f"{EXTRAS.get(name, name)}://{bucket.lower()}{sep}{key}"


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
