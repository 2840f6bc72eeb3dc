"""Find the credentials a client sent, and check the shape of ids (pure).

Also the plain records the auth layers pass each other (``TokenRow``).

First found wins (README, "Connecting from a browser"): the Socket.IO ``auth`` payload, then the query
string, then ``Authorization: Bearer`` (with organizationId from auth or query).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from app.errors import Refusal

_ORGANIZATION_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_TOKEN = 4096


@dataclass(frozen=True)
class Credentials:
    """A token and the organization the client asks to listen to."""

    token: str
    organization_id: str

    def __repr__(self) -> str:  # never show the token
        return f"Credentials(token=..., organization_id={self.organization_id!r})"


@dataclass(frozen=True)
class TokenRow:
    """What the database says of a token, seen for one organization."""

    user_id: str
    active: bool
    #: seconds until ``expires`` as the database computes it; None: never
    expires_in: float | None
    member: bool


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """Parse ORGCAST_TRUSTED_PROXIES' addresses and CIDRs (validated by config)."""
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def is_trusted(address: str, networks: Sequence[Network]) -> bool:
    """Tell whether ``address`` is one of the trusted proxies."""
    return _in(address, networks)


def _in(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(environ: Mapping[str, Any], trusted: Sequence[Network]) -> str:
    """Return the client's address: the peer's, or the one a trusted proxy reports.

    When the peer is a trusted proxy, ``X-Forwarded-For`` is read from the
    right, skipping trusted proxies: the first hop that is not one is the
    client (what an untrusted client puts further left is ignored). A peer
    that is not trusted is the client, whatever header it sends.
    """
    peer = str(environ.get("REMOTE_ADDR", ""))
    if not trusted or not _in(peer, trusted):
        return peer
    hops = [hop.strip() for hop in str(environ.get("HTTP_X_FORWARDED_FOR", "")).split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage where an address should be: do not trust it
    return hops[0] if hops else peer


def is_valid_organization_id(value: str) -> bool:
    """Tell whether ``value`` is 1-64 characters of ``A-Z a-z 0-9 _ -``."""
    return _ORGANIZATION_RE.fullmatch(value) is not None


def is_valid_user_id(value: str) -> bool:
    """Tell whether ``value`` is 1-80 printable characters without whitespace."""
    return 0 < len(value) <= 80 and value.isprintable() and not any(c.isspace() for c in value)


def _text(value: Any) -> str | None:
    """Accept strings and integers (JS clients send ids as numbers); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value:
        return value
    return None


def _bearer(environ: Mapping[str, Any]) -> str | None:
    scheme, _, value = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def extract(auth: Any, environ: Mapping[str, Any]) -> Credentials:
    """Return the client's credentials; the first source that has a value wins.

    A value of the wrong type (a list, an object, a boolean) counts as found
    and invalid: it does not fall through to the next source.

    :raise Refusal: token_missing, organization_missing, organization_invalid,
        token_invalid (in that order)
    """
    payload: Mapping[str, Any] = auth if isinstance(auth, Mapping) else {}
    # engine.io parsed this query string already; gunicorn caps its length.
    query = parse_qs(environ.get("QUERY_STRING", ""))

    def from_query(name: str) -> str | None:
        values = query.get(name)
        return values[0] if values and values[0] else None

    raw_token = payload.get("token")
    if raw_token in (None, ""):
        token = from_query("token") or _bearer(environ)
    else:
        token = _text(raw_token) or ""  # found, but not a string: invalid below
    if token is None:
        raise Refusal("token_missing")

    raw_org = payload.get("organizationId")
    organization_id = from_query("organizationId") if raw_org in (None, "") else _text(raw_org)
    if organization_id is None:
        if raw_org not in (None, ""):
            raise Refusal("organization_invalid")
        raise Refusal("organization_missing")
    if not is_valid_organization_id(organization_id):
        raise Refusal("organization_invalid")
    if not is_plausible_token(token):
        # Not a string, longer than any real token, or text no database column holds: do not ask.
        raise Refusal("token_invalid")
    return Credentials(token=token, organization_id=organization_id)


def is_plausible_token(token: Any) -> bool:
    """Tell whether ``token`` could be a stored token: a string of 1-4096 characters, no NUL, valid UTF-8.

    (Postgres refuses NUL and lone surrogates in text: the lookup would fail
    as if the database were down, and the client be told to retry.)
    """
    if not isinstance(token, str) or not 0 < len(token) <= _MAX_TOKEN or "\x00" in token:
        return False
    try:
        token.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
