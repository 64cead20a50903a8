"""Who may call the service: an optional bearer token (metadata `authorization: Bearer <token>`)
and TLS / mutual TLS, all from `serve.*` files (a Kubernetes Secret mounts as files).

A call without a token is UNAUTHENTICATED, one with another token PERMISSION_DENIED. Health checks
stay open, so that liveness and readiness probes need no secret.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from towerline.config import ServeConfig
from towerline.errors import ConfigError

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def read_secret(path: Path, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}={path}: cannot read it ({exc.strerror})") from None
    if not data.strip():
        raise ConfigError(f"{setting}={path}: the file is empty")
    return data


class TokenAuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization")
        if given is None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED,
                            "authorization: missing; send metadata 'authorization: Bearer <token>'")
        if not hmac.compare_digest(str(given).encode(), self._expected):
            return _refusal(handler, grpc.StatusCode.PERMISSION_DENIED, "authorization: the token is not accepted")
        return handler


def _refusal(handler: Any, code: grpc.StatusCode, message: str) -> Any:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=None,
                                                   response_serializer=handler.response_serializer)
    # Streaming methods (reflection): refused the same way, reading nothing.
    def refuse_stream(requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse_stream, request_deserializer=None,
                                                 response_serializer=handler.response_serializer)


def auth_interceptors(serve: ServeConfig) -> list[grpc.ServerInterceptor]:
    if serve.auth_token_file is None:
        return []
    return [TokenAuthInterceptor(read_secret(serve.auth_token_file, "serve.auth_token_file").decode().strip())]


def server_credentials(serve: ServeConfig) -> grpc.ServerCredentials | None:
    """TLS when serve.tls_cert_file and tls_key_file are set; mutual TLS when tls_client_ca_file is too."""
    if serve.tls_cert_file is None and serve.tls_key_file is None:
        if serve.tls_client_ca_file is not None:
            raise ConfigError("serve.tls_client_ca_file needs serve.tls_cert_file and serve.tls_key_file")
        return None
    if serve.tls_cert_file is None or serve.tls_key_file is None:
        raise ConfigError("TLS needs both serve.tls_cert_file and serve.tls_key_file")
    key = read_secret(serve.tls_key_file, "serve.tls_key_file")
    chain = read_secret(serve.tls_cert_file, "serve.tls_cert_file")
    client_ca = (read_secret(serve.tls_client_ca_file, "serve.tls_client_ca_file")
                 if serve.tls_client_ca_file is not None else None)
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)
