"""Every error envelope cortex and neuron send is built here.

An `ApiError` is surface-neutral: status, a message a person can act on,
the OpenAI `type`/`code`/`param`, and extra headers. Each API surface
renders it in its own shape (the OpenAI one lives here; the Anthropic one
joins it when that surface lands).
"""

from __future__ import annotations

import math
from typing import Any

from common.asgi import encode_json


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or []

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def openai_bytes(self) -> bytes:
        return encode_json(self.openai_body())


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def invalid_json(detail: str) -> ApiError:
    return ApiError(400, f"We could not parse the JSON body of your request: {detail}", code="invalid_json")


def context_length_exceeded(prompt_tokens: int, output_tokens: int, context_tokens: int) -> ApiError:
    return ApiError(
        400,
        f"This model's maximum context length is {context_tokens} tokens. However, you requested "
        f"{prompt_tokens + output_tokens} tokens ({prompt_tokens} in the messages, {output_tokens} "
        "in the completion). Please reduce the length of the messages or completion.",
        param="messages",
        code="context_length_exceeded",
    )


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model}` does not exist or is not served by any neuron; GET /v1/models lists the served models.",
        param="model",
        code="model_not_found",
    )


def not_found(path: str) -> ApiError:
    return ApiError(404, f"Unknown request URL: {path}. Please check the URL and method.", code="unknown_url")


def method_not_allowed(method: str, path: str, allowed: list[str]) -> ApiError:
    return ApiError(
        405,
        f"Method {method} is not allowed on {path}; allowed: {', '.join(allowed)}.",
        code="method_not_allowed",
        headers=[(b"allow", ", ".join(allowed).encode())],
    )


def payload_too_large(limit_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"Request body is larger than the limit of {limit_bytes} bytes.",
        code="request_too_large",
    )


def body_timeout(timeout_s: float) -> ApiError:
    return ApiError(
        408, f"The request body did not arrive within {timeout_s:g} s.", code="request_timeout",
        headers=[(b"connection", b"close")],
    )


def body_buffer_full() -> ApiError:
    return ApiError(
        503, "cortex is buffering too many request bodies at once; retry shortly.",
        type="service_unavailable", code="service_unavailable", headers=retry_after_headers(1),
    )


def websocket_refused() -> ApiError:
    return ApiError(
        400, "This server does not serve WebSockets; stream with an HTTP POST and \"stream\": true.",
        code="websocket_not_supported",
    )


def retry_after_headers(retry_after_s: float) -> list[tuple[bytes, bytes]]:
    """`retry-after` in whole seconds (rounded up) plus exact milliseconds."""
    return [
        (b"retry-after", str(max(1, math.ceil(retry_after_s))).encode()),
        (b"retry-after-ms", str(max(1, math.ceil(retry_after_s * 1000))).encode()),
    ]


def service_unavailable(message: str, retry_after_s: float) -> ApiError:
    return ApiError(
        503,
        message,
        type="service_unavailable",
        code="service_unavailable",
        headers=retry_after_headers(retry_after_s),
    )


def upstream_error(message: str, status: int = 502) -> ApiError:
    return ApiError(status, message, type="upstream_error", code="upstream_error")


def upstream_timeout(message: str) -> ApiError:
    return ApiError(504, message, type="upstream_error", code="upstream_timeout")


def server_overloaded(message: str, retry_after_s: float) -> ApiError:
    return ApiError(
        503, message, type="server_error", code="overloaded", headers=retry_after_headers(retry_after_s)
    )
