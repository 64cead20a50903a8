"""Hot reload: follow an index registry's CURRENT and the query encoder's artifact, swap atomically.

Every `serve.reload_interval_s` (and at once on SIGHUP) the reloader reads which index version
CURRENT names and the encoder's manifest fingerprint. When either changed, it loads the new pair
*beside* the one being served — checksums verified, embedding spaces compared — and only then swaps
the servicer's reference to it: calls in flight finish on the old pair, the next ones get the new.
A corrupt, half-written or incompatible version is refused and logged, the old pair keeps serving,
and the same refused state is not retried until something changes again. A server started before
anything was published reports NOT_SERVING until the first version loads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from indexing.layout import INDEX_KIND
from indexing.publish import is_registry_entry, resolve_published
from serving.app import build_service
from serving.onnx_format import ONNX_KIND
from serving.service import RetrievalService
from towerline.artifacts import MANIFEST_NAME, read_manifest
from towerline.config import TowerlineConfig
from towerline.errors import TowerlineError
from towerline.tower_spec import QUERY_TOWER_KINDS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairState:
    """What a (index, encoder) pair is: the index version's and the encoder's fingerprints, and the
    version's name — a re-publish of the same content under a new name is loaded too, so that what
    the service reports (GetIndexInfo, each response's index_version) is what CURRENT names."""

    index: str
    encoder: str
    version: str = ""


class Reloader:
    def __init__(self, config: TowerlineConfig, index_path: Path, encoder_path: Path,
                 serving: RetrievalService | None = None,
                 on_swap: Callable[[RetrievalService], None] | None = None) -> None:
        """`serving`: the pair being served now (None: nothing yet); `on_swap` puts a new pair in
        service (serve_forever sets it to its servicer's swap)."""
        self.config = config
        self.index_path = Path(index_path)
        self.encoder_path = Path(encoder_path)
        self.on_swap = on_swap
        self.refused: PairState | None = None
        self.last_refusal = ""
        # The pair being served was loaded from what is on disk now.
        self.served = self.wanted() if serving is not None else None
        self.wake = threading.Event()  # set by SIGHUP: check now

    def wanted(self) -> PairState | None:
        """The pair on disk now; None while nothing is published at the index path yet."""
        version = ""
        if is_registry_entry(self.index_path):
            index_dir = resolve_published(self.index_path)
            version = index_dir.name
        elif (self.index_path / MANIFEST_NAME).is_file():
            index_dir = self.index_path
        else:
            return None
        index = read_manifest(index_dir, INDEX_KIND).fingerprint
        encoder = read_manifest(self.encoder_path, (ONNX_KIND, *QUERY_TOWER_KINDS)).fingerprint
        return PairState(index, encoder, version)

    def check(self) -> str:
        """One look at the disk; returns what happened, for logs and tests."""
        try:
            wanted = self.wanted()
        except TowerlineError as exc:
            return self._refuse(None, str(exc))
        if wanted is None:
            return "nothing published yet"
        if wanted == self.served:
            return "unchanged"
        if wanted == self.refused:
            return "unchanged (refused before)"
        try:
            service = build_service(self.config, self.index_path, self.encoder_path)
        except TowerlineError as exc:
            return self._refuse(wanted, str(exc))
        assert self.on_swap is not None, "Reloader.on_swap is not set"
        self.on_swap(service)
        # What was read before loading: if the disk moved on meanwhile, the next check loads again.
        self.served, self.refused = wanted, None
        message = f"now serving index {service.index.version} with {service.query_encoder.name}"
        log.warning(message)
        return message

    def run(self, stop: threading.Event) -> None:
        """Check every serve.reload_interval_s, or at once when `wake` is set, until `stop`."""
        while not stop.is_set():
            self.wake.wait(self.config.serve.reload_interval_s)
            self.wake.clear()
            if not stop.is_set():
                self.check()

    def _refuse(self, wanted: PairState | None, reason: str) -> str:
        self.refused = wanted
        message = f"refused to reload, still serving the previous pair: {reason}"
        self.last_refusal = message
        log.error(message)
        return message

