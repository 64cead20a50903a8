"""Serving-side fault scenarios of `towerline bench reliability`, each against real `towerline serve`
processes on loopback under a search load through the project's client.

- publish_kill: publishers SIGKILLed at random moments while the service serves the registry entry;
  after each kill every listed version verifies, CURRENT names a complete one, the next publish
  succeeds and the service reloads it, and no call fails.
- bad_versions: CURRENT pointed at a corrupt, a half-copied, an incompatible (another embedding
  space) and a missing version: each refused, the old version keeps answering, a good one loads after.
- overload: bursts far past serve.max_concurrent_rpcs: only documented codes (RESOURCE_EXHAUSTED),
  the service answers normally right after, and its memory over a soak stays bounded.
- replica_kill: two replicas behind the client's round-robin, one SIGKILLed mid-load: no call lost.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.fault_tally import CallTally, Scenario, SearchLoad
from benchmarks.serve_process import ServeProcess
from indexing.layout import INDEX_KIND
from indexing.publish import CURRENT_FILE, _write_current, list_versions, publish_index, resolve_published
from towerline.artifacts import read_manifest, reseal_artifact
from towerline.config import TowerlineConfig
from towerline.errors import ArtifactError

ENTRY_NAME = "corpus"
KEEP_VERSIONS = 4
RELOAD_INTERVAL_S = 0.2
RELOAD_WAIT_S = 15.0
REFUSAL = "refused to reload"  # serving/reload.py's log line

# A publisher in a process of its own, so that it can be killed at any point of the publish.
_PUBLISHER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from indexing.publish import publish_index
    print("go", flush=True)
    publish_index(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], keep=int(sys.argv[4]))
    print("done", flush=True)
""")


def publish_kill(config: TowerlineConfig, index: Path, onnx: Path, work_dir: Path, texts: list[str], trials: int,
                 rng: random.Random) -> Scenario:
    scenario = Scenario("publish_kill")
    registry = work_dir / "registry-publish"
    entry = registry / ENTRY_NAME
    # Two contents to alternate: the service reloads on a change of content (the manifest's
    # fingerprint), so each completed publish must differ from what CURRENT holds.
    variants = [index, _variant(index, work_dir / "index-variant-b", "b")]
    publish_index(index, registry, ENTRY_NAME)
    serve = config.serve.model_copy(update={"reload_interval_s": RELOAD_INTERVAL_S})
    killed_mid_publish = 0
    with ServeProcess(config, entry, onnx, serve) as server, SearchLoad(server.address, texts) as load:
        publish_s = _timed_publish(variants[1], registry)
        for trial in range(trials):
            scenario.trials += 1
            publisher = _publisher(_other(variants, entry), registry)
            assert publisher.stdout is not None and publisher.stdout.readline().strip() == "go"
            time.sleep(rng.uniform(0.0, publish_s * 0.9))  # inside the measured publish, mostly
            if publisher.poll() is None:
                publisher.kill()
                killed_mid_publish += 1
                scenario.faults_injected += 1
            publisher.wait()
            for problem in _entry_problems(entry):
                scenario.lost(f"trial {trial}: {problem}")
            try:
                version = publish_index(_other(variants, entry), registry, ENTRY_NAME, keep=KEEP_VERSIONS).name
            except (ArtifactError, OSError) as error:
                scenario.lost(f"trial {trial}: the publish after the kill failed: {error}")
                continue
            if not _serves(server.address, version):
                scenario.lost(f"trial {trial}: {version} was not reloaded within {RELOAD_WAIT_S:g} s")
    scenario.add_calls(load.calls)
    scenario.details.update(publish_seconds=round(publish_s, 3), killed_mid_publish=killed_mid_publish,
                            versions_served=len(load.versions))
    return scenario


def bad_versions(config: TowerlineConfig, index: Path, onnx: Path, work_dir: Path, texts: list[str]) -> Scenario:
    scenario = Scenario("bad_versions")
    registry = work_dir / "registry-bad"
    entry = registry / ENTRY_NAME
    good = publish_index(index, registry, ENTRY_NAME).name
    serve = config.serve.model_copy(update={"reload_interval_s": RELOAD_INTERVAL_S})
    refused = {}
    with ServeProcess(config, entry, onnx, serve) as server, SearchLoad(server.address, texts) as load:
        for kind, make in (("corrupt", _corrupt), ("half_copied", _half_copied), ("incompatible", _as_it_is),
                           ("missing", None)):
            scenario.trials += 1
            scenario.faults_injected += 1
            log_mark = len(server.log_file.read_text())
            if make is None:
                (entry / CURRENT_FILE).write_text("v9999\n")  # names a version that is not there
            else:
                # Each bad version has content of its own: one equal to the served one is no change.
                bad = _variant(entry / good, entry / f"v{len(list_versions(entry)) + 1:04d}", kind,
                               incompatible=kind == "incompatible")
                _write_current(entry, make(bad).name)
            time.sleep(RELOAD_INTERVAL_S * 10)  # ten reload checks
            served = _served_version(server.address)
            # Refused for what it is, not skipped as unchanged: the service says so in its log.
            refused[kind] = served == good and REFUSAL in server.log_file.read_text()[log_mark:]
            if not refused[kind]:
                scenario.lost(f"{kind} version: served {served!r}, refusal logged: "
                              f"{REFUSAL in server.log_file.read_text()[log_mark:]}")
            _write_current(entry, good)
        version = publish_index(_variant(index, work_dir / "index-variant-good", "good"), registry, ENTRY_NAME).name
        if not _serves(server.address, version):
            scenario.lost(f"the good version {version} published after the bad ones was not reloaded")
    scenario.add_calls(load.calls)
    scenario.details["refused_and_kept_serving"] = refused
    return scenario


def overload(config: TowerlineConfig, index: Path, onnx: Path, texts: list[str], bursts: int, burst_calls: int,
             soak_s: float) -> Scenario:
    """serve.max_concurrent_rpcs = 4 with 64 callers in flight: most calls are shed."""
    from evaluation.load import run_load

    scenario = Scenario("overload")
    serve = config.serve.model_copy(update={"max_concurrent_rpcs": 4, "reload_interval_s": 0})
    with ServeProcess(config, index, onnx, serve) as server:
        rss = {"start_mb": round(server.rss_mb(), 1)}
        recovered = []
        for _ in range(bursts):
            scenario.trials += 1
            scenario.faults_injected += 1
            result = run_load(_search_caller(server.address, texts), 64, requests=burst_calls)
            scenario.add_calls(_tally(result), failures_expected=True)
            # Right after the burst, the service answers one caller normally.
            with SearchLoad(server.address, texts, threads=1) as after:
                time.sleep(1.0)
            scenario.add_calls(after.calls)
            recovered.append(after.calls.failed() == 0 and after.calls.sent > 0)
            if not server.alive():
                scenario.lost("the server died under the burst")
                break
        rss["after_bursts_mb"] = round(server.rss_mb(), 1)
        samples = _soak(server, texts, soak_s, scenario)
    quarter = max(1, len(samples) // 4)
    rss.update(soak_seconds=soak_s, soak_samples=len(samples), soak_first_quarter_median_mb=round(
        statistics.median(samples[:quarter]), 1), soak_last_quarter_median_mb=round(statistics.median(
            samples[-quarter:]), 1), soak_max_mb=round(max(samples), 1))
    rss["soak_growth_ratio"] = round(rss["soak_last_quarter_median_mb"] / rss["soak_first_quarter_median_mb"], 3)
    scenario.details.update(recovered_after_each_burst=all(recovered), memory=rss, max_concurrent_rpcs=4,
                            burst_concurrency=64)
    return scenario


def replica_kill(config: TowerlineConfig, index: Path, onnx: Path, texts: list[str], trials: int,
                 rng: random.Random) -> Scenario:
    scenario = Scenario("replica_kill")
    serve = config.serve.model_copy(update={"reload_interval_s": 0})
    with ServeProcess(config, index, onnx, serve) as first, ServeProcess(config, index, onnx, serve) as second:
        replicas = (first, second)
        for trial in range(trials):
            scenario.trials += 1
            victim = replicas[trial % 2]
            with SearchLoad(f"{first.address},{second.address}", texts, threads=4) as load:
                time.sleep(rng.uniform(0.5, 1.5))
                victim.kill()
                scenario.faults_injected += 1
                time.sleep(2.0)  # calls go on against the survivor
            scenario.add_calls(load.calls)
            victim.start()  # back on its port for the next trial
    return scenario


def _publisher(index: Path, registry: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(index), str(registry), ENTRY_NAME,
                             str(KEEP_VERSIONS)], stdout=subprocess.PIPE, text=True)


def _timed_publish(index: Path, registry: Path) -> float:
    """Seconds from the publisher's "go" (imports done) to its "done": the window kills are drawn in."""
    publisher = _publisher(index, registry)
    assert publisher.stdout is not None and publisher.stdout.readline().strip() == "go"
    started = time.perf_counter()
    finished = publisher.stdout.readline().strip()
    seconds = time.perf_counter() - started
    if publisher.wait() != 0 or finished != "done":
        raise ArtifactError(f"a publish of {index} failed (exit {publisher.returncode})")
    return seconds


def _entry_problems(entry: Path) -> list[str]:
    """What a reader could see wrong in the entry: a listed version that does not verify, or a CURRENT
    that does not name a complete version. Hidden staging directories are invisible to readers."""
    problems = []
    for version in list_versions(entry):
        try:
            read_manifest(entry / version, INDEX_KIND, verify=True)
        except ArtifactError as error:
            problems.append(f"visible version {version} is not complete: {error}")
    try:
        read_manifest(resolve_published(entry), INDEX_KIND, verify=True)
    except ArtifactError as error:
        problems.append(f"CURRENT: {error}")
    return problems


def _served_version(address: str) -> str:
    from serving.client import RetrievalClient

    with RetrievalClient(address, timeout_s=10) as client:
        return client.info().index_version


def _serves(address: str, version: str) -> bool:
    give_up = time.monotonic() + RELOAD_WAIT_S
    while time.monotonic() < give_up:
        if _served_version(address) == version:
            return True
        time.sleep(0.05)
    return False


def _variant(source: Path, dest: Path, tag: str, *, incompatible: bool = False) -> Path:
    """A complete, verifying copy of an index with content of its own (one more file); `incompatible`:
    of another embedding space, which the query encoder cannot search."""
    metadata = {}
    if incompatible:
        metadata["embedding_space"] = "f" * len(read_manifest(source, INDEX_KIND).metadata.get("embedding_space", ""))
    reseal_artifact(source, dest, INDEX_KIND, producer="bench reliability", new_files={"bench-variant.txt": tag},
                    metadata=metadata)
    return dest


def _other(variants: list[Path], entry: Path) -> Path:
    """The variant whose content is not the one CURRENT names."""
    current = read_manifest(resolve_published(entry), INDEX_KIND).fingerprint
    return next(path for path in variants if read_manifest(path, INDEX_KIND).fingerprint != current)


def _corrupt(version: Path) -> Path:
    target = version / "index.faiss"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the checksum catches it
    target.unlink()  # a new file: the variant's files may be hard links to the source's
    target.write_bytes(bytes(data))
    return version


def _half_copied(version: Path) -> Path:
    (version / "index.faiss").unlink()  # a copy that stopped before its largest file
    return version


def _as_it_is(version: Path) -> Path:
    return version


def _search_caller(address: str, texts: list[str]) -> Any:
    from evaluation.load import grpc_caller
    from serving.proto.towerline.v1 import retrieval_pb2 as pb

    def search(stub: Any, number: int) -> Any:
        return stub.Search(pb.SearchRequest(query=texts[number % len(texts)], top_k=5), timeout=30)

    return grpc_caller(address, search)


def _tally(load_result: dict[str, Any]) -> CallTally:
    calls = CallTally()
    calls.record("OK", load_result["requests"])
    for code, count in load_result["errors"].items():
        calls.record(code, count)
    return calls


def _soak(server: ServeProcess, texts: list[str], soak_s: float, scenario: Scenario) -> list[float]:
    """Steady load at 8 callers for `soak_s`, the server's RSS sampled twice a second."""
    from evaluation.load import run_load

    samples: list[float] = []
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def drive() -> None:
        outcome.update(run_load(_search_caller(server.address, texts), 8, duration_s=soak_s))
        done.set()

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    while not done.wait(0.5):
        samples.append(server.rss_mb())
    driver.join()
    scenario.add_calls(_tally(outcome), failures_expected=True)
    return samples or [server.rss_mb()]
