"""Keeping credentials out of messages, logs and manifests."""

from __future__ import annotations

import os
import re

_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s\"']*@")
_SIGNED_QUERY = re.compile(r"(X-Amz-(?:Security-Token|Signature|Credential)=)[^&\s\"']+",
                           re.IGNORECASE)
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                     "AWS_ACCESS_KEY_ID")


def scrub(text: str) -> str:
    """`text` without URL userinfo, presigned-URL credentials or the AWS secrets in use."""
    for name in _SECRET_VARIABLES:
        secret = os.environ.get(name, "")
        if len(secret) >= 8:  # short values would mangle ordinary words
            text = text.replace(secret, "***")
    text = _USERINFO.sub(r"\1***@", text)
    return _SIGNED_QUERY.sub(r"\1***", text)


_AUTHORITY = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)?(?P<authority>[^/?#]*)")


def strip_userinfo(url: str | None) -> str | None:
    """An endpoint URL without `user:password@`: S3 signs requests with the AWS
    credentials, never with URL userinfo, and it must not reach a message or a log.
    A value without a scheme (`user:secret@host:9000`) loses its userinfo too."""
    if not url or "@" not in url:
        return url
    match = _AUTHORITY.match(url)
    authority = match.group("authority")
    if "@" not in authority:
        return url
    return (match.group("scheme") or "") + authority.rpartition("@")[2] + url[match.end():]



