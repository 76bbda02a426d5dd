"""Who may call the API: bearer tokens (`machaon tokens create NAME --role viewer|operator`).

A token comes in an `Authorization: Bearer ...` header or, from the web page, in the HttpOnly
cookie TOKEN_COOKIE. Only its SHA-256 is stored (operations.authenticate). Readers are viewers or
operators; actions need an operator. With `api.read_requires_token = false`, reading needs no
token (e.g. behind a proxy that signs people in) and the caller is ANONYMOUS.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .. import operations as ops
from ..store import Role

TOKEN_COOKIE = "machaon_token"
ANONYMOUS = ops.Principal("anonymous", Role.VIEWER)

# Declares the scheme in the OpenAPI description (the docs page's "Authorize" button); the header is
# read by presented_token, which also takes the page's cookie.
_BEARER = HTTPBearer(auto_error=False, description="a token from `machaon tokens create NAME --role ROLE`")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]

_HOW_TO = ("create one with `machaon tokens create NAME --role viewer|operator` and send it as "
           "`Authorization: Bearer TOKEN`")


class AuthError(Exception):
    """A request without the right credentials: 401 (who are you?) or 403 (not allowed)."""

    def __init__(self, status_code: int, message: str):
        super().__init__(message)
        self.status_code = status_code

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"} if self.status_code == 401 else {}


def presented_token(request: Request, cookie: bool = True) -> str | None:
    """The token in the Authorization header, else (where `cookie`) in the page's cookie."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return (request.cookies.get(TOKEN_COOKIE) or None) if cookie else None


def _principal(request: Request, cookie: bool = True) -> ops.Principal:
    token = presented_token(request, cookie)
    if token is None:
        if request.headers.get("authorization"):
            raise AuthError(401, f"the Authorization header is not a bearer token: {_HOW_TO}")
        raise AuthError(401, f"this needs an API token: {_HOW_TO}")
    principal = ops.authenticate(request.app.state.store, token)
    if principal is None:
        raise AuthError(401, f"the API token is unknown or revoked: {_HOW_TO}")
    return principal


def reader(request: Request, _bearer: Bearer) -> ops.Principal:
    """A dependency: a viewer or operator (anyone, when reading needs no token and none is sent)."""
    if not request.app.state.settings.api.read_requires_token and presented_token(request) is None:
        return ANONYMOUS
    return _principal(request)


def actor(request: Request, _bearer: Bearer) -> ops.Principal:
    """A dependency: an operator, the only role that may act (retry, cancel, reprocess, complete).
    Only from the Authorization header: a browser sends the page's cookie with a form posted from
    any page of the same site (another port of this host, say), so the cookie is for the page's own
    forms, which check where they come from."""
    principal = _principal(request, cookie=False)
    if principal.role != Role.OPERATOR:
        raise AuthError(403, f"token {principal.name!r} is a viewer's: this action needs an operator "
                        "token (`machaon tokens create NAME --role operator`)")
    return principal
