"""Python client for the retrieval service: typed results, typed errors, readiness wait."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.errors import RetrievalRpcError
from serving.messages import (
    from_index_info_response,
    from_recommend_response,
    from_search_response,
    knobs_to_proto,
    mode_to_proto,
)
from serving.proto.towerline.v1 import retrieval_pb2 as pb
from serving.proto.towerline.v1 import retrieval_pb2_grpc as pb_grpc
from serving.results import Hit, IndexInfo, Recommendation, SearchKnobs, SearchResult
from serving.security import read_secret
from serving.servicer import SERVICE_NAME
from towerline.errors import ConfigError

Response = TypeVar("Response")

# Round-robin over the resolved addresses; UNAVAILABLE (a replica down or without an index) is
# retried with exponential backoff — gRPC retries only calls no server has begun to answer.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": SERVICE_NAME}],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}
CHANNEL_OPTIONS = [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1)]


@dataclass(frozen=True)
class ClientTls:
    """PEM files: the CA that signed the server's certificate; for mutual TLS, this client's own pair."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("mutual TLS needs both a client certificate and its key")
        return grpc.ssl_channel_credentials(
            root_certificates=read_secret(self.ca_file, "--tls-ca"),
            private_key=read_secret(self.key_file, "--tls-key") if self.key_file else None,
            certificate_chain=read_secret(self.cert_file, "--tls-cert") if self.cert_file else None,
        )


def channel_target(address: str) -> str:
    """One "host:port" as it is; several comma-separated replicas as gRPC's static ipv4:/ipv6: list."""
    replicas = [part.strip() for part in address.split(",") if part.strip()]
    if len(replicas) == 1:
        return replicas[0]
    hosts = [replica.rsplit(":", 1)[0].strip("[]") for replica in replicas]
    try:
        versions = {ipaddress.ip_address(host).version for host in hosts}
    except ValueError:
        raise ConfigError(f"several addresses must be IP literals (ip:port,ip:port), got {address!r}; for host "
                         "names use one DNS name that resolves to every replica") from None
    if len(versions) > 1:
        raise ConfigError(f"several addresses must be all IPv4 or all IPv6, got {address!r}")
    return f"ipv{versions.pop()}:{','.join(replicas)}"


class RetrievalClient:
    """`with RetrievalClient("host:port") as client: client.search("query", top_k=10)`."""

    def __init__(self, address: str | Sequence[str], timeout_s: float = 10.0, batch_size: int = 64, *,
                 token: str | None = None, tls: ClientTls | None = None) -> None:
        """`address`: "host:port", or several replicas ("ip:port,ip:port" or a list of IP literals) that
        calls are spread over round-robin; a call answered UNAVAILABLE is retried with backoff (on
        another replica when there are several). `token`: sent as `authorization: Bearer <token>`;
        `tls`: a TLS channel (mutual TLS with a client certificate)."""
        self.address = address if isinstance(address, str) else ",".join(address)
        self.timeout_s = timeout_s
        # Queries per BatchSearch call; keep it at or below the server's serve.max_batch.
        self.batch_size = batch_size
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        target = channel_target(self.address)
        self._channel = (grpc.secure_channel(target, tls.credentials(), options=CHANNEL_OPTIONS) if tls is not None
                         else grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
        self._stub = pb_grpc.RetrievalServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def search(self, query: str, top_k: int = 10, mode: str = "", knobs: SearchKnobs | None = None,
               include_documents: bool = False) -> list[Hit]:
        """Hits best first, each a named tuple (doc_id, score, dense_score, sparse_score, title, snippet).
        `mode`: "dense", "sparse", "hybrid", or "" for the server's default; `knobs`: this request's
        nprobe / ef_search (None: the index's own); `include_documents`: titles and snippets too."""
        return self.search_result(query, top_k, mode, knobs, include_documents).hits

    def search_result(self, query: str, top_k: int = 10, mode: str = "", knobs: SearchKnobs | None = None,
                      include_documents: bool = False) -> SearchResult:
        """Hits plus the index version, the mode served and the server-side latency."""
        request = pb.SearchRequest(query=query, top_k=top_k, mode=mode_to_proto(mode), knobs=knobs_to_proto(knobs),
                                   include_documents=include_documents)
        return from_search_response(self._call(self._stub.Search, request))

    def batch_search(self, queries: list[str], top_k: int = 10, mode: str = "", knobs: SearchKnobs | None = None,
                     include_documents: bool = False) -> list[list[Hit]]:
        """Hits per query, in query order (the `BatchSearch` shape evaluation takes)."""
        return [result.hits for result in self.batch_search_results(queries, top_k, mode, knobs, include_documents)]

    def batch_search_results(self, queries: list[str], top_k: int = 10, mode: str = "",
                             knobs: SearchKnobs | None = None, include_documents: bool = False) -> list[SearchResult]:
        """Long lists go out as several BatchSearch calls of `batch_size` queries each."""
        results: list[SearchResult] = []
        for start in range(0, len(queries), self.batch_size):
            request = pb.BatchSearchRequest(queries=queries[start : start + self.batch_size], top_k=top_k,
                                            mode=mode_to_proto(mode), knobs=knobs_to_proto(knobs),
                                            include_documents=include_documents)
            response = self._call(self._stub.BatchSearch, request)
            results.extend(from_search_response(item) for item in response.results)
        return results

    def recommend(self, user_id: str = "", history_item_ids: Sequence[str] = (), top_k: int = 10) -> Recommendation:
        """Top-k items for a user id and/or recent item ids (most recent last)."""
        request = pb.RecommendRequest(user_id=user_id, history_item_ids=list(history_item_ids), top_k=top_k)
        return from_recommend_response(self._call(self._stub.Recommend, request))

    def info(self) -> IndexInfo:
        return from_index_info_response(self._call(self._stub.GetIndexInfo, pb.GetIndexInfoRequest()))

    def health(self, service: str = SERVICE_NAME) -> str:
        """The health status name ("SERVING", "NOT_SERVING", ...) the server reports for `service`."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server reports SERVING for the retrieval service, or raise UNAVAILABLE."""
        deadline = time.monotonic() + timeout
        last_status = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RetrievalRpcError(
                    "UNAVAILABLE", f"{self.address} not serving after {timeout:g}s (last: {last_status})"
                )
            try:
                request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
                # wait_for_ready: ride out "connection refused" while the server is still starting.
                response = self._health.Check(request, timeout=min(remaining, 1.0), wait_for_ready=True)
                last_status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                last_status = f"{error.code().name}: {error.details()}"
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RetrievalClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, method: Callable[..., Response], request: object) -> Response:
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise RetrievalRpcError(error.code().name, error.details() or "") from None
