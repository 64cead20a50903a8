"""Scatter-gather over index shards (`towerline index shard`): every Search goes to every shard's
service at once, and the hits are merged by score into the global top-k.

Each shard returns its own top k, since the global top k may all lie in one shard; the merge keeps
the k best by score, ties broken by doc id, so the order never depends on which shard answered
first. Each shard address is a RetrievalClient of its own, so a shard may itself be several replicas
("ip:port,ip:port": round-robin and retries on UNAVAILABLE, as for one service).

Dense only: BM25 scores depend on the statistics of the corpus that was indexed, so two shards' BM25
scores do not compare, and shard artifacts carry no BM25 side.

A shard that fails means an error, never a silently partial top-k: the call raises ShardError naming
every failed shard and its status code. `allow_partial=True` opts into merging the shards that
answered when the others are unavailable (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED), and
each result then names the missing shards; any other error (a bad request) still raises.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from serving.client import ClientTls, RetrievalClient
from serving.errors import RetrievalRpcError
from serving.results import Hit, IndexInfo, SearchKnobs, SearchResult
from towerline.errors import ConfigError

T = TypeVar("T")
# The codes of a shard that is down or overloaded, as opposed to a request the shards refuse.
UNAVAILABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})


class ShardError(RetrievalRpcError):
    """One or more shards failed; `failures` maps each failed shard's address to "CODE: details"."""

    def __init__(self, code: str, details: str, failures: dict[str, str]) -> None:
        super().__init__(code, details)
        self.failures = failures


@dataclass(frozen=True)
class ShardedSearchResult:
    hits: list[Hit]
    # The index version each shard answered from, in shard order ("" for a missing shard).
    shard_versions: tuple[str, ...]
    # Shards left out of the merge (only with allow_partial=True); empty when every shard answered.
    missing_shards: tuple[str, ...]
    latency_ms: float


def merge_hits(per_shard: Sequence[Sequence[Hit]], top_k: int) -> list[Hit]:
    """The `top_k` best hits of all shards, by score, ties by doc id; a document found by two shards
    means the shards overlap (the same shard served twice, or shards of different splits)."""
    owner: dict[str, int] = {}
    for shard, hits in enumerate(per_shard):
        for hit in hits:
            if owner.setdefault(hit.doc_id, shard) != shard:
                raise ConfigError(f"document {hit.doc_id!r} came from shard {owner[hit.doc_id]} and from shard "
                                  f"{shard}: every address must serve a different shard of one split")
    return heapq.nsmallest(top_k, (hit for hits in per_shard for hit in hits), key=lambda hit: (-hit.score, hit.doc_id))


class ShardedRetrievalClient:
    """`with ShardedRetrievalClient(["10.0.0.1:50051", "10.0.0.2:50051"]) as client: client.search("q", 10)`."""

    def __init__(self, shard_addresses: Sequence[str], timeout_s: float = 10.0, batch_size: int = 64, *,
                 token: str | None = None, tls: ClientTls | None = None, allow_partial: bool = False) -> None:
        """`shard_addresses`: one address per shard, each "host:port" or that shard's replicas
        ("ip:port,ip:port"). The other arguments are RetrievalClient's, applied to every shard."""
        if len(shard_addresses) < 2:
            raise ConfigError(f"a sharded client needs the addresses of at least 2 shards, got {len(shard_addresses)}")
        self.addresses = tuple(shard_addresses)
        self.allow_partial = allow_partial
        self._shards = [RetrievalClient(address, timeout_s, batch_size, token=token, tls=tls)
                        for address in self.addresses]
        # One thread per shard: the calls of one search run side by side.
        self._pool = ThreadPoolExecutor(max_workers=len(self._shards), thread_name_prefix="shard")

    def search(self, query: str, top_k: int = 10, knobs: SearchKnobs | None = None,
               include_documents: bool = False) -> list[Hit]:
        return self.search_result(query, top_k, knobs, include_documents).hits

    def search_result(self, query: str, top_k: int = 10, knobs: SearchKnobs | None = None,
                      include_documents: bool = False) -> ShardedSearchResult:
        started = time.perf_counter()
        answers = self._scatter(lambda shard: [shard.search_result(query, top_k, "dense", knobs,
                                                                   include_documents)])
        return self._gathered(answers, top_k, started)[0]

    def batch_search(self, queries: list[str], top_k: int = 10, knobs: SearchKnobs | None = None,
                     include_documents: bool = False) -> list[list[Hit]]:
        """Hits per query, in query order (the shape evaluation takes)."""
        return [result.hits for result in self.batch_search_results(queries, top_k, knobs, include_documents)]

    def batch_search_results(self, queries: list[str], top_k: int = 10, knobs: SearchKnobs | None = None,
                             include_documents: bool = False) -> list[ShardedSearchResult]:
        started = time.perf_counter()
        answers = self._scatter(lambda shard: shard.batch_search_results(queries, top_k, "dense", knobs,
                                                                         include_documents))
        return self._gathered(answers, top_k, started)

    def infos(self) -> list[IndexInfo]:
        """Every shard's GetIndexInfo, refused unless they share one embedding space and no two
        serve the same index version (the same shard twice)."""
        infos = self._scatter(lambda shard: shard.info())
        failed = {address: answer for address, answer in zip(self.addresses, infos, strict=True)
                  if isinstance(answer, RetrievalRpcError)}
        if failed:
            raise self._error(failed, "GetIndexInfo")
        checked: list[IndexInfo] = [info for info in infos if isinstance(info, IndexInfo)]
        spaces = {info.embedding_space for info in checked}
        if len(spaces) > 1:
            named = zip(self.addresses, checked, strict=True)
            raise ConfigError("shards of different embedding spaces: "
                              + ", ".join(f"{address} {info.embedding_space[:12]}…" for address, info in named))
        fingerprints = [info.index_fingerprint for info in checked]
        if len(set(fingerprints)) < len(fingerprints):
            raise ConfigError("two addresses serve the same index version: every address must serve a different "
                              f"shard ({', '.join(self.addresses)})")
        return checked

    def wait_ready(self, timeout: float = 30.0) -> None:
        for shard in self._shards:
            shard.wait_ready(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> ShardedRetrievalClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _scatter(self, call: Callable[[RetrievalClient], T]) -> list[T | RetrievalRpcError]:
        """`call` on every shard at once; a shard's RetrievalRpcError is returned in its place."""
        def guarded(shard: RetrievalClient) -> T | RetrievalRpcError:
            try:
                return call(shard)
            except RetrievalRpcError as error:
                return error

        return list(self._pool.map(guarded, self._shards))

    def _gathered(self, answers: list[list[SearchResult] | RetrievalRpcError], top_k: int,
                  started: float) -> list[ShardedSearchResult]:
        failed = {address: answer for address, answer in zip(self.addresses, answers, strict=True)
                  if isinstance(answer, RetrievalRpcError)}
        tolerated = self.allow_partial and len(failed) < len(answers) and all(
            error.code in UNAVAILABLE_CODES for error in failed.values())
        if failed and not tolerated:
            raise self._error(failed, "Search")
        answered = [answer for answer in answers if not isinstance(answer, RetrievalRpcError)]
        latency_ms = (time.perf_counter() - started) * 1000.0
        missing = tuple(failed)
        results = []
        for per_query in zip(*answered, strict=True):
            versions = iter(result.index_version for result in per_query)
            results.append(ShardedSearchResult(
                hits=merge_hits([result.hits for result in per_query], top_k),
                shard_versions=tuple("" if address in failed else next(versions) for address in self.addresses),
                missing_shards=missing, latency_ms=latency_ms))
        return results

    def _error(self, failed: dict[str, RetrievalRpcError], method: str) -> ShardError:
        shard_of = {address: number for number, address in enumerate(self.addresses)}
        described = {address: f"{error.code}: {error.details}" for address, error in failed.items()}
        listed = "; ".join(f"shard {shard_of[address]} ({address}) {text}" for address, text in described.items())
        hint = ("" if self.allow_partial else
                "; no partial results (allow_partial=True merges the shards that answered)")
        return ShardError(next(iter(failed.values())).code,
                          f"{method} failed on {len(failed)} of {len(self.addresses)} shards: {listed}{hint}",
                          described)
