"""The server-API key check: ``Authorization: Bearer <one of ORGCAST_API_KEYS>``."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from typing import Any, TypeVar

from flask import request

from app.errors import ApiError
from app.http import services

F = TypeVar("F", bound=Callable[..., Any])


def check_api_key(authorization: str, keys: tuple[str, ...]) -> None:
    """Accept the header if it carries one of the keys.

    :raise ApiError: api_disabled, unauthorized
    """
    if not keys:
        raise ApiError("api_disabled")
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiError("unauthorized")
    candidate = presented.strip().encode()
    # Compare against every key, in constant time each, without stopping early.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.encode())
    if not matched:
        raise ApiError("unauthorized")


def require_api_key(view: F) -> F:
    """Refuse the request with 401 unless it carries a valid API key."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_api_key(request.headers.get("Authorization", ""), services().settings.api_keys)
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
