"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, for every failure:
bad input (400, `param` naming the field, pydantic's errors included), a missing key (401), an
unknown model (404), a body over the limit (413), a full waiting room (429), a server shutting
down (503) and anything unexpected (500)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("jaxserve.http")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "server_error"}


class APIError(Exception):
    """A request that gets an error answer; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status,
                        headers=dict(headers or {}))


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


# An engine ValueError starts with the field it is about: "max_tokens must be >= 1, got 0",
# "prompt_token_ids[3] = 99 is not a token id", "structured_outputs.json must be ...".
_LEADING_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)")


def from_value_error(exc: ValueError, renames: Mapping[str, str] | None = None) -> APIError:
    """A 400 for the engine's ValueError; its leading field name (through `renames`, engine name ->
    request field) becomes `param`."""
    message = str(exc)
    match = _LEADING_FIELD.match(message)
    param = match.group(1) if match else None
    if param is not None:
        param = {"prompt_token_ids": "prompt"}.get(param, param)
        param = (renames or {}).get(param, param)
    return APIError(400, message, param=param)


def param_from_loc(loc: Sequence[Any]) -> str | None:
    """pydantic's error location as OpenAI writes params: `messages[0].content`. The leading
    "body" and pydantic's union-member tags (`str`, `list[int]`, `function-after[...]`) are dropped."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and item != "body" and _is_field_name(item):
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


def _is_field_name(part: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part)) and part not in _PYDANTIC_TAGS


_PYDANTIC_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "null", "tuple", "set", "bytes"}


def validation_message(error: Mapping[str, Any]) -> tuple[str, str | None]:
    """One pydantic error as (message, param)."""
    kind, loc = error.get("type", ""), tuple(error.get("loc", ()))
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        position = next((item for item in loc if isinstance(item, int)), None)
        where = f" at character {position}" if position is not None else ""
        return f"the body is not valid JSON: {detail}{where}".rstrip(), None
    param = param_from_loc(loc)
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "value_error":  # our validators' messages name their field
        lead = _LEADING_FIELD.match(message)
        if param is None:
            return message, lead.group(1) if lead else None
        return (message if message.startswith(param) else f"{param}: {message}"), param
    if param is None:
        return "the body must be a JSON object with the request's fields", None
    if kind == "extra_forbidden":
        return f"unknown field {param!r}: this endpoint has no such parameter", param
    if kind == "missing":
        return f"{param} is required", param
    got = error.get("input")
    shown = json.dumps(got)[:80] if _jsonable(got) else type(got).__name__
    return f"{param}: {message[0].lower() + message[1:]}, got {shown}", param


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app raises answers in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        # Of a union's failed members, the one that got furthest says most: `input[0]: call_id`
        # rather than "input: not a string".
        deepest = max(errors, key=lambda error: len(error.get("loc", ())), default=None)
        message, param = validation_message(deepest) if deepest else ("invalid request", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"{request.url.path} failed: {type(exc).__name__}: {exc}")
