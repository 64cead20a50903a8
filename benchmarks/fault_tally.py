"""What `towerline bench reliability` counts per scenario, and the search load it runs faults under."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

# The status codes the retrieval API documents (protos/towerline/v1/retrieval.proto, serving/security.py):
# anything else a caller sees (INTERNAL, UNKNOWN, a crash's UNAVAILABLE after every retry is counted
# apart) is a failure outside the contract.
DOCUMENTED_CODES = frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                              "FAILED_PRECONDITION", "UNAUTHENTICATED", "PERMISSION_DENIED"})


@dataclass
class Scenario:
    """One fault scenario's figures. `requests_failed`: calls that did not succeed although the
    scenario expects them to (the client's retries included); `requests_failed_undocumented`: calls
    answered with a code outside DOCUMENTED_CODES; `data_lost`: trials that lost or exposed data
    (a partial or corrupt version visible or served, a version missing, a publish or reload that did
    not happen, an output left at a target by a killed job, a row neither output nor quarantined)."""

    name: str
    trials: int = 0
    faults_injected: int = 0
    requests_sent: int = 0
    requests_failed: int = 0
    requests_failed_undocumented: int = 0
    data_lost: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add_calls(self, calls: CallTally, *, failures_expected: bool = False) -> None:
        """Fold a load's calls in; with `failures_expected` (overload, fuzzing, auth) only
        undocumented codes count as failures."""
        self.requests_sent += calls.sent
        self.requests_failed_undocumented += calls.undocumented()
        if not failures_expected:
            self.requests_failed += calls.failed()
        for code, count in calls.codes.items():
            self.details.setdefault("codes", {})
            self.details["codes"][code] = self.details["codes"].get(code, 0) + count

    def lost(self, problem: str) -> None:
        self.data_lost += 1
        self.problems.append(problem)

    def as_dict(self) -> dict[str, Any]:
        return {"trials": self.trials, "faults_injected": self.faults_injected, "requests_sent": self.requests_sent,
                "requests_failed": self.requests_failed,
                "requests_failed_undocumented": self.requests_failed_undocumented, "data_lost": self.data_lost,
                **self.details, "problems": self.problems[:20]}


class CallTally:
    """Thread-safe count of calls by outcome ("OK" or the status code's name)."""

    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, code: str, count: int = 1) -> None:
        with self._lock:
            self.codes[code] += count

    @property
    def sent(self) -> int:
        return sum(self.codes.values())

    def failed(self) -> int:
        return self.sent - self.codes["OK"]

    def undocumented(self) -> int:
        return sum(count for code, count in self.codes.items() if code != "OK" and code not in DOCUMENTED_CODES)


class SearchLoad:
    """`with SearchLoad(address, texts) as load:` — `threads` callers searching back to back through
    the project's client (round-robin and retries over comma-separated replicas) until the block ends.
    `load.versions` counts the index versions that answered."""

    def __init__(self, address: str, texts: list[str], threads: int = 2, timeout_s: float = 10.0) -> None:
        self.address = address
        self.texts = texts
        self.timeout_s = timeout_s
        self.calls = CallTally()
        self.versions: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(number,), daemon=True) for number in range(threads)]

    def __enter__(self) -> SearchLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, number: int) -> None:
        from serving.client import RetrievalClient
        from serving.errors import RetrievalRpcError

        with RetrievalClient(self.address, timeout_s=self.timeout_s) as client:
            turn = number
            while not self._stop.is_set():
                turn += len(self._threads)
                try:
                    result = client.search_result(self.texts[turn % len(self.texts)], 5)
                except RetrievalRpcError as error:
                    self.calls.record(error.code)
                    continue
                self.calls.record("OK")
                with self._lock:
                    self.versions[result.index_version] += 1
