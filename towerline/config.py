"""Typed, layered configuration: model defaults → YAML file → `key=value` overrides.

One `TowerlineConfig` holds a section per stage, so a single YAML file (one per scale in
`configs/`) drives the whole pipeline and each command reads the section it owns.
Every model forbids unknown keys, so a typo fails at the edge with the key named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from towerline.errors import ConfigError
from towerline.templates import DEFAULT_DOC_TEMPLATE, check_doc_template


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    dataset: str = "scifact"
    # A BEIR-layout directory; when unset, $TOWERLINE_DATA_DIR/<dataset>, then the bundled copy.
    dir: Path | None = None
    # A directory of <split>.tsv qrels used instead of DIR/qrels (e.g. a `data split` artifact's qrels/).
    qrels_dir: Path | None = None
    # Malformed rows (bad JSON, no id, empty document, duplicate id, bad qrels line) in every stage:
    # fail naming the file and line, or quarantine them and go on.
    on_malformed: Literal["fail", "quarantine"] = "fail"
    # Qrels scores at or above this are positives; below it (0 included) are judged non-relevant.
    positive_min: int = Field(1, ge=1)


class SparkConfig(Section):
    master: str = "local[2]"
    driver_memory: str = "2g"
    shuffle_partitions: int = Field(4, ge=1)
    # Commands stop the session after their Spark jobs, to free the driver JVM's memory before
    # training. A process that runs many jobs (a test session) keeps it: each start costs ~20 s.
    keep_session: bool = False


class PairsConfig(Section):
    split: str = "train"
    negatives_per_query: int = Field(3, ge=0)
    # BM25 candidates considered per query; positives among them are skipped.
    bm25_top_k: int = Field(30, ge=1)
    # Skip the very top BM25 hits: they are often unjudged positives (false negatives).
    skip_top: int = Field(0, ge=0)
    # Positive-aware mining: drop candidates scoring above this fraction of the query's weakest
    # positive's BM25 score (e.g. 0.95); unset keeps every candidate.
    negative_margin: float | None = Field(None, gt=0)
    stemmer: Literal["english", "none"] = "english"


class ClicksConfig(Section):
    """`towerline pairs --logs`: impression/click logs → training pairs (pipelines/click_pairs.py).

    A positive is a click whose dwell reaches `min_dwell_ms` (a satisfied click: a click followed by
    a quick return says the result did not answer). Negatives come from four sources, each with its
    own number per query, in this order and without repeats: documents shown above a satisfied click
    and skipped (the user read past them: the strongest implicit negative, Joachims 2002), BM25 hard
    negatives (top `pairs.bm25_top_k` minus the query's positives), model-mined ones (with an index),
    and random corpus documents."""

    min_dwell_ms: int = Field(30_000, ge=0)
    skipped_negatives: int = Field(2, ge=0)
    bm25_negatives: int = Field(2, ge=0)
    random_negatives: int = Field(1, ge=0)
    # Model-mined negatives (ANCE-style): the query encoder and index given to `pairs --logs --index
    # --encoder` retrieve for each query, and this many are drawn (seeded) from ranks
    # model_rank_window[0] + 1 … model_rank_window[1]: below the very top, where unjudged positives
    # crowd, yet still hard. Placed after the BM25 ones.
    model_negatives: int = Field(0, ge=0)
    model_rank_window: tuple[int, int] = (30, 200)
    # Per-query cap: the query's positives with the most satisfied clicks (ties: doc id) are kept.
    max_positives_per_query: int = Field(10, ge=1)
    # A query longer than this (after normalisation) is quarantined, not truncated.
    max_query_chars: int = Field(512, ge=1)
    # The run fails, writing nothing, when more than this fraction of the log rows is quarantined.
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    # Queries whose normalised-text hash falls in this fraction go to dev_pairs.parquet, not pairs.parquet.
    dev_fraction: float = Field(0.1, ge=0, lt=1)
    # Seeds the random negatives (with each query's id: the same picks on every run and partitioning).
    seed: int = 13

    @field_validator("model_rank_window")
    @classmethod
    def _window(cls, window: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= window[0] < window[1]:
            raise ValueError(f"expected 0 <= start < end, got {window}")
        return window


class EncoderConfig(Section):
    # A registered name ("minilm") or a Hugging Face model directory.
    backbone: str = "minilm"
    pooling: Literal["mean", "cls", "last_token"] = "mean"
    query_prefix: str = ""
    doc_prefix: str = ""
    # Title and text into one string for the doc tower, e.g. "Title: {title}\nPassage: {text}".
    doc_template: str = DEFAULT_DOC_TEMPLATE
    max_query_length: int = Field(64, ge=4)
    max_doc_length: int = Field(256, ge=4)
    normalize: bool = True

    @field_validator("doc_template")
    @classmethod
    def _valid_template(cls, template: str) -> str:
        return check_doc_template(template)


class LoopConfig(Section):
    """The training-loop settings stage 1 and stage 2 share (both run on transformers' Trainer)."""

    epochs: float = Field(1.0, gt=0)
    # When set, overrides epochs.
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=2)
    learning_rate: float = Field(2e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    # Note for stage 1: each accumulated micro-batch is its own contrastive batch (fewer in-batch
    # negatives); train.grad_cache_chunk keeps the whole batch as one contrastive batch instead.
    gradient_accumulation_steps: int = Field(1, ge=1)
    # fp16 trains with a grad scaler and needs a GPU; auto: bf16 (or fp16) on GPU, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 13
    log_every: int = Field(10, ge=1)
    # Checkpoint every N optimizer steps (0: none), for `--resume`.
    save_steps: int = Field(0, ge=0)
    save_total_limit: int = Field(2, ge=1)


class TrainConfig(LoopConfig):
    temperature: float = Field(0.05, gt=0)
    learn_temperature: bool = False
    hard_negatives: int = Field(1, ge=0)
    # ScalingNote keeps two towers initialised from one checkpoint; sharing is an option.
    shared_towers: bool = False
    lora: bool = False
    lora_rank: int = Field(8, ge=1)
    gradient_checkpointing: bool = False
    # GradCache: encode the contrastive batch this many texts at a time (memory of one chunk,
    # negatives and gradients of the whole batch); 0 encodes the batch in one pass.
    grad_cache_chunk: int = Field(0, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    # Hold out N judged queries of the pairs as dev (at most a fifth of them; 0: off): scored before
    # training and after every epoch over their positives + dev_pool corpus documents; the best
    # weights ship, and never weights worse on dev than the starting towers.
    dev_queries: int = Field(100, ge=0)
    dev_pool: int = Field(2000, ge=1)
    # Default: OUTPUT.checkpoints beside the artifact.
    checkpoint_dir: Path | None = None
    # FSDP (full shard) under torchrun, for towers too large to replicate on every rank (LLM towers):
    # parameters, gradients and optimizer state sharded across ranks, each transformer block wrapped
    # on its own. fsdp_wrap: the block class names (empty: the backbone's own _no_split_modules).
    fsdp: bool = False
    fsdp_wrap: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fsdp_alone(self) -> TrainConfig:
        # Each of these reads or rewrites whole towers outside the Trainer's sharded step.
        clashes = {"train.lora": self.lora, "train.grad_cache_chunk": self.grad_cache_chunk,
                   "train.dev_queries": self.dev_queries}
        if self.fsdp and any(clashes.values()):
            named = ", ".join(name for name, value in clashes.items() if value)
            raise ValueError(f"train.fsdp does not combine with {named}; set them off (0 / false)")
        return self


class DistillConfig(LoopConfig):
    """ScalingNote stage 2: a small query tower learns the frozen teacher query tower's embeddings."""

    # "layers:N": the teacher query tower's lower N layers; else a registered backbone or HF model
    # directory (with a linear projection when its width differs from the teacher's).
    student: str = "layers:3"
    # Measured on SciFact (layers:3 of the fine-tuned MiniLM): lr 1e-4 x 3 epochs reached dev nDCG@10
    # 0.551, 5e-4 x 2 reached 0.653, 1e-3 x 2 reached 0.681 (teacher 0.744).
    epochs: float = Field(2.0, gt=0)
    batch_size: int = Field(32, ge=2)
    learning_rate: float = Field(1e-3, gt=0)
    # loss = mse_weight * |s - t|^2 + cosine_weight * (1 - cos(s, t)), per query, averaged.
    mse_weight: float = Field(1.0, ge=0)
    cosine_weight: float = Field(1.0, ge=0)
    # A student wider or narrower than its teacher gets a projection: started at the least-squares
    # map to the teacher's embeddings, or at random.
    projection_init: Literal["least_squares", "random"] = "least_squares"
    # Ranking distillation over the teacher's own index, added to the loss with this weight (0: off;
    # 1 measured better at both scales, see the README):
    # KL(teacher || student) of the softmax over the documents the teacher ranks in its top
    # rank_candidates for any query of the batch, scores divided by rank_temperature. MSE + cosine
    # match the embedding; this term matches what the service returns from it.
    rank_weight: float = Field(1.0, ge=0)
    rank_candidates: int = Field(32, ge=1)
    rank_temperature: float = Field(0.05, gt=0)
    # Judged train queries held out to score the student by retrieval against the teacher's index.
    dev_queries: int = Field(100, ge=1)
    # Pseudo-queries per document: its title (when it has pseudo_min_words) and N sentences.
    pseudo_sentences_per_doc: int = Field(1, ge=0)
    pseudo_min_words: int = Field(4, ge=1)
    pseudo_max_words: int = Field(40, ge=1)
    # A text file of extra unlabeled queries (a query log), one per line.
    query_log: Path | None = None


class ExportConfig(Section):
    opset: int = Field(18, ge=14)
    parity_atol: float = Field(1e-4, gt=0)
    # ONNX Runtime's extended graph optimisations (fusions), saved offline; for the CPU EP.
    optimize: bool = False
    # int8 dynamic quantisation of the weights; accepted when every parity text keeps this cosine.
    quantize: Literal["none", "int8"] = "none"
    int8_min_cosine: float = Field(0.99, gt=0, le=1)


class IndexConfig(Section):
    # "ivf" is IVF-Flat; "ivf_pq" stores product-quantised codes (optionally rotated by OPQ);
    # "auto" picks by corpus size and memory_budget_mb (indexing.factory.choose_index_type).
    type: Literal["flat", "hnsw", "ivf", "ivf_pq", "auto"] = "flat"
    batch_size: int = Field(64, ge=1)
    # The corpus is embedded in shards of this many documents, each saved as it finishes: a build
    # that dies resumes from the last finished shard (indexing.embed_shards).
    embed_shard_size: int = Field(20_000, ge=1)
    # "bf16": embed the corpus under bf16 autocast (about 2x faster for a 135M LLM on this CPU; the
    # vectors are stored as fp32 either way). fp32 by default so that indexes are bit-reproducible.
    precision: Literal["fp32", "bf16"] = "fp32"
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_construction: int = Field(200, ge=8)
    hnsw_ef_search: int = Field(128, ge=8)
    ivf_nlist: int = Field(256, ge=1)
    ivf_nprobe: int = Field(16, ge=1)
    # IVF-PQ: sub-quantisers (must divide the dimension; None: dim / 8) of pq_nbits bits each.
    pq_m: int | None = Field(None, ge=1)
    pq_nbits: int = Field(8, ge=4, le=12)
    opq: bool = False
    # At most this many vectors train the IVF centroids / PQ codebooks (a seeded random sample).
    train_sample: int = Field(200_000, ge=1_000)
    # type=auto: exact search below this many documents; above, the most accurate structure whose
    # estimated size fits memory_budget_mb (None: no limit) — HNSW, then IVF-Flat, then IVF-PQ.
    auto_exact_below: int = Field(50_000, ge=1)
    memory_budget_mb: float | None = Field(None, gt=0)
    use_gpu: Literal["auto", "never", "always"] = "auto"
    # A BM25 index of the same corpus beside the dense one, in the same index version (hybrid search).
    sparse: bool = True
    # A document store (title, text) in the same version, so that Search can return documents.
    doc_store: bool = True
    # The doc vectors and a hash of each document's text, so that `index update` embeds only new or
    # changed documents (doubles the version's disk size for flat / HNSW, not its memory).
    embedding_cache: bool = True
    # Serve the index file memory-mapped (read-only) instead of read into memory: replicas on one host
    # share the page cache, and a large index starts without a full read.
    mmap: bool = False
    sparse_stemmer: Literal["english", "none"] = "english"


class FusionConfig(Section):
    """How hybrid search merges the dense and the BM25 top lists. An index tuned by
    `towerline eval tune-fusion` carries its own choice, which wins over these defaults."""

    # "rrf": reciprocal-rank fusion, sum of 1 / (rrf_k + rank) over the sides that found a document;
    # "convex": dense_weight * dense + (1 - dense_weight) * BM25, each min-max normalised per query.
    method: Literal["rrf", "convex"] = "rrf"
    rrf_k: int = Field(60, ge=1)
    dense_weight: float = Field(0.5, ge=0, le=1)
    # Hits taken from each side before fusing.
    depth: int = Field(100, ge=1)
    # tune-fusion: judged train queries held out as dev when the index's encoder held none out.
    dev_queries: int = Field(100, ge=1)
    # How tune-fusion picks from its grid. "significant": the fusion above (the untuned default) stays
    # unless a candidate beats it on dev beyond chance — paired t-test and randomisation test over the
    # dev queries, Holm-corrected over the grid, both below tune_alpha — and then the best of those.
    # A hundred dev queries are few, and train queries need not behave like the eval queries (SciFact:
    # BM25 0.763 on dev, 0.686 on test), so a small dev lead is no reason to leave the default.
    # "best": the grid's best dev nDCG@10, however small its lead.
    selection: Literal["significant", "best"] = "significant"
    tune_alpha: float = Field(0.05, gt=0, le=1)
    seed: int = 13


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # Retrieval calls executing (encode + search) at once; admitted ones beyond wait for a slot.
    # With batching: micro-batches executing at once.
    max_workers: int = Field(4, ge=1)
    # Retrieval calls admitted at once (executing or waiting); one more is RESOURCE_EXHAUSTED.
    # Health checks are never counted.
    max_concurrent_rpcs: int = Field(64, ge=1)
    # The longest an admitted call waits for an execution slot (or, batched, in the batch queue)
    # before it is shed with RESOURCE_EXHAUSTED, so that latency stays bounded when clients send no
    # deadline; None: wait as long as the call's deadline allows.
    max_queue_wait_ms: float | None = Field(1000.0, gt=0)
    max_top_k: int = Field(1000, ge=1)
    max_batch: int = Field(256, ge=1)
    max_query_chars: int = Field(4096, ge=1)
    # Characters of a document's text returned as its snippet (include_documents).
    snippet_chars: int = Field(300, ge=0)
    intra_op_threads: int = Field(1, ge=1)
    # Follow the index (a registry's CURRENT, or an artifact re-sealed in place) and the query
    # encoder: look every reload_interval_s seconds (and at once on SIGHUP); 0 turns it off.
    reload_interval_s: float = Field(10.0, ge=0)
    # On SIGTERM: health goes NOT_SERVING, calls are still answered for drain_delay_s (a load
    # balancer's probe interval, so it stops routing here first), then in-flight calls get
    # shutdown_grace_s to finish.
    drain_delay_s: float = Field(0.0, ge=0)
    shutdown_grace_s: float = Field(5.0, ge=0)
    # A file holding the bearer token every retrieval call must send (unset: no auth). Health
    # checks stay open for probes.
    auth_token_file: Path | None = None
    # TLS: certificate chain and private key (PEM); with a client CA too, mutual TLS.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    # Prometheus /metrics on this HTTP port (0: any free port); unset: no metrics endpoint.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    # One log record per retrieval call (request id, method, status code, latency, peer), and the
    # format of the service's log lines on stderr: "text", or "json" (one object per line).
    access_log: bool = False
    log_format: Literal["text", "json"] = "text"
    # Dynamic micro-batching of Search calls (serving.batcher): off, each call encodes alone.
    batching: bool = False
    batch_max_size: int = Field(16, ge=1)
    batch_max_wait_ms: float = Field(2.0, ge=0)
    batch_queue: int = Field(256, ge=1)
    # Length buckets for micro-batches: upper bounds in characters (a query longer than the last is in
    # a bucket of its own kind); queries of one bucket are batched together. Empty: one bucket.
    batch_length_buckets: list[PositiveInt] = Field(default_factory=list)
    # Retrieval mode of a request that names none: "auto" is hybrid when the index has a BM25 side,
    # else dense.
    mode: Literal["auto", "dense", "sparse", "hybrid"] = "auto"
    # Users' histories behind Recommend: "latest" (every interaction) or "test-start" (only those
    # before the test period: a replay of that moment, so that `rec eval` can score a live service).
    recommend_state: Literal["latest", "test-start"] = "latest"


class EvalConfig(Section):
    split: str = "test"
    top_k: int = Field(100, ge=10)
    batch_size: int = Field(32, ge=1)


class TrackingConfig(Section):
    enabled: bool = True
    # Unset: $MLFLOW_TRACKING_URI, else a sqlite file in the working directory.
    uri: str | None = None
    experiment: str = "towerline"
    # `export` registers each ONNX query encoder as a new version of this MLflow model; "" disables.
    query_encoder_model: str = "towerline-query-encoder"
    # `index build` registers each index (by reference: its directory) as a new version of this model,
    # `train` each dual encoder (query + doc towers) as one of this.
    index_model: str = "towerline-index"
    towers_model: str = "towerline-dual-encoder"


class RecDataConfig(Section):
    """The recommendation side's interactions: `towerline rec data` (pipelines/interactions.py)."""

    # "synthetic": generated under run_dir (the embedded default); a directory holding a MovieLens
    # release or the generic schema; or a name looked up under $TOWERLINE_DATA_DIR (e.g. ml-100k).
    dataset: str = "synthetic"
    format: Literal["auto", "ml-100k", "ml-dat", "ml-csv", "generic"] = "auto"
    on_malformed: Literal["fail", "quarantine"] = "fail"
    # A sample is positive when its rating is above this (RecLoRA's MovieLens protocol: > 3).
    label_threshold: float = 3.0
    long_history: int = Field(60, ge=1)
    short_history: int = Field(10, ge=1)
    # Global time split: the latest interactions are test, the ones before them valid.
    valid_fraction: float = Field(0.1, gt=0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0, lt=0.5)
    synthetic_users: int = Field(600, ge=10)
    synthetic_items: int = Field(400, ge=10)
    synthetic_seed: int = 7


class CrmConfig(Section):
    """The CTR ranking model (DIN). Defaults follow the DIN paper's public setup: 18-wide embeddings
    per field, an 80/40 attention unit, a 200/80 MLP, Adam at 1e-3."""

    # Width of every field's embedding (item id, genre, user id, gender, age, occupation).
    embedding_dim: int = Field(18, ge=1)
    # A learned vector per user id. Off by default: on a global time split most test users are new
    # (ML-100K: 86 % of test samples), and an id embedding no training step reached is noise to the
    # MLP. Measured on ML-100K (seed 0): valid / test AUC 0.741 / 0.762 without, test 0.754 with.
    user_id_embedding: bool = False
    attention_hidden: tuple[PositiveInt, ...] = Field((80, 40), min_length=1)
    mlp_hidden: tuple[PositiveInt, ...] = Field((200, 80), min_length=1)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(256, ge=1)
    eval_batch_size: int = Field(1024, ge=1)
    max_epochs: int = Field(10, ge=1)
    # Epochs without a better valid AUC before training stops; the best epoch's weights are kept.
    patience: int = Field(2, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    # Most recent history items the model sees (the artifact holds at most rec.data.long_history).
    history_length: int = Field(60, ge=1)
    # The target item's train-split statistics as two more MLP inputs: its smoothed positive rate
    # (logit) and its log count. GAUC ranks items within a user, where how well an item is liked by
    # everyone says much; counted on train samples only, so nothing leaks from valid or test.
    # Measured on ML-100K (seed 0, same run): test AUC / GAUC 0.7634 / 0.7021 without, 0.7618 / 0.7037
    # with (within the seed spread, ±0.002); valid GAUC peaks at epoch 1 either way. Off by default.
    item_statistics: bool = False
    # Also tried on ML-100K (seed 0, same run; test GAUC 0.7021 as is): a learned per-item logit added
    # to the MLP's (wide & deep) 0.7019, choosing the epoch on valid GAUC instead of AUC 0.6989 (it
    # peaks at epoch 1). Neither kept.
    # DIN's mini-batch aware regularisation (the paper's section 4.3): each step adds
    # embedding_l2 * sum over the item ids in the batch of ||w_j||² / n_j (n_j: 1 + the item's train
    # samples), so rarely seen items — whose few samples their embeddings memorise — are held near 0.
    # Chosen on valid AUC on ML-100K (seed 0, same run; valid / test AUC, test GAUC):
    # 0 → 0.7397 / 0.7634, 0.7021; 0.01 → 0.7418; 0.03 → 0.7417; 0.1 → 0.7428 / 0.7675, 0.7111;
    # 0.3 → 0.7404; 1.0 → 0.7323. Plain AdamW weight decay 0.1 on every weight: 0.7398 / 0.7633, 0.7025.
    embedding_l2: float = Field(0.1, ge=0)
    seed: int = 0


class TwoTowerConfig(Section):
    """Candidate retrieval: user tower (history + user features) and item tower (id, genres, title)."""

    embedding_dim: int = Field(32, ge=1)
    output_dim: int = Field(64, ge=2)
    temperature: float = Field(0.05, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    batch_size: int = Field(256, ge=2)
    epochs: int = Field(10, ge=1)
    # The user tower reads the latest N items of the history.
    history_length: int = Field(20, ge=1)
    # Text tower for item titles: a registered backbone or a model directory ("" leaves titles out).
    title_encoder: str = "minilm"
    # In-batch negatives are drawn by popularity: subtract log(item frequency) from the training logits
    # (Yi et al., RecSys 2019) so that the scores estimate the full softmax, popularity included.
    logq_correction: bool = True
    # A learned vector per user id (off: most users of a time-split test period are new, see rec.crm).
    user_id_embedding: bool = False
    seed: int = 0


class RecLoraConfig(Section):
    """RecLoRA (arXiv 2408.03533): an LLM CTR scorer with a bank of meta-LoRAs mixed per user by a gate
    fed with the CRM's user representation; the LLM trains on a sample of the train split (Few2Many)."""

    # A registered decoder (smollm2) or a Hugging Face causal-LM directory.
    llm: str = "smollm2"
    experts: int = Field(8, ge=1)
    rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    target_modules: tuple[str, ...] = Field(("q_proj", "v_proj"), min_length=1)
    # soft: α = softmax(gate(user)/T); top_k: only the k largest α kept; uniform: α = 1/K for every
    # user (the ablation without the CRM's gate). experts=1 with uniform is one shared LoRA (TALLRec).
    routing: Literal["soft", "top_k", "uniform"] = "soft"
    top_k: int = Field(2, ge=1)
    gate_hidden: int = Field(64, ge=1)
    gate_temperature: float = Field(1.0, gt=0)
    # Items of the long history put into the prompt, picked by title relevance to the target or the latest.
    prompt_history: int = Field(5, ge=0)
    prompt_history_mode: Literal["relevant", "recent"] = "relevant"
    # Text tower embedding titles for the relevance pick: a registered backbone or a model directory.
    title_encoder: str = "minilm"
    max_prompt_tokens: int = Field(160, ge=16)
    # Few2Many: the CRM saw the whole train split; the LLM and the bank see this many train samples.
    train_samples: int = Field(3000, ge=1)
    # Test samples scored (a seeded sample when fewer than the split; None: all of them).
    eval_samples: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    # Export the scorer (LLM + bank, α as an input) to ONNX in the artifact, parity-checked on test prompts.
    export_onnx: bool = True
    # Recommend with a reclora artifact: the DIN top-N re-scored by the LLM (N prompts per call on CPU).
    rerank_top_n: int = Field(5, ge=1)
    seed: int = 0


class RecConfig(Section):
    """The recommendation side (`towerline rec ...`)."""

    data: RecDataConfig = RecDataConfig()
    crm: CrmConfig = CrmConfig()
    two_tower: TwoTowerConfig = TwoTowerConfig()
    reclora: RecLoraConfig = RecLoraConfig()


class TowerlineConfig(Section):
    run_dir: Path = Path("runs")
    data: DataConfig = DataConfig()
    spark: SparkConfig = SparkConfig()
    pairs: PairsConfig = PairsConfig()
    clicks: ClicksConfig = ClicksConfig()
    encoder: EncoderConfig = EncoderConfig()
    train: TrainConfig = TrainConfig()
    distill: DistillConfig = DistillConfig()
    export: ExportConfig = ExportConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()
    fusion: FusionConfig = FusionConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    rec: RecConfig = RecConfig()

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, for MLflow params."""
        return _flatten(self.model_dump(mode="json"))


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> TowerlineConfig:
    return _validated(_read_yaml(path) if path else {}, overrides, path)


def with_overrides(config: TowerlineConfig, overrides: list[str]) -> TowerlineConfig:
    """A copy of `config` with `key=value` overrides applied and validated as on the command line."""
    return _validated(config.model_dump(mode="json"), overrides, None)


def _validated(raw: dict[str, Any], overrides: list[str] | None, path: Path | None) -> TowerlineConfig:
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    try:
        return TowerlineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def dump_config(config: BaseModel, path: Path) -> None:
    path.write_text(config_yaml(config))


def config_yaml(config: BaseModel) -> str:
    """The config as the YAML an artifact's config.yaml holds (and `-c FILE` reads back)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return loaded


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=2)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    # No setting is a mapping: "Title: {title}" is a template, not YAML's {"Title": {"title": None}}.
    if isinstance(value, dict):
        value = text
    return key.strip(), value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {'.'.join(parts[: depth + 1])!r} is not a section")
        node = child
    node[parts[-1]] = value


def _describe(exc: ValidationError, path: Path | None) -> str:
    source = f" (in {path} or overrides)" if path else ""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown config key {key!r}{source}"
    return f"config key {key!r}: {error['msg']} (got {error.get('input')!r}){source}"


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
