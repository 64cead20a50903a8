"""GradCache (Gao et al., 2021) on transformers' Trainer: a contrastive batch larger than memory.

Gradient accumulation splits the batch, and with it the negatives: each micro-batch only sees its
own documents. GradCache keeps the batch whole instead:
1. embed every query and document in chunks without building graphs (recording each chunk's RNG
   state, so dropout can be replayed);
2. compute the full-batch loss on those embeddings (cross-device gather included) and backpropagate
   it only as far as the embeddings;
3. re-embed each chunk with the graph, under the same RNG state, and backpropagate the cached
   embedding gradients into the towers, one chunk in memory at a time.
The parameter gradients equal those of one full-batch step. Under DDP the chunk passes run on the
unwrapped model (DDP's reducer expects one backward per forward), so this step averages the
gradients across ranks itself, after the last chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist

from towerline.hf_trainer import OrderedLossTrainer

Embed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RngState:
    """The CPU (and current CUDA device) generator state at one point, to replay dropout masks."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    @contextmanager
    def replayed(self) -> Iterator[None]:
        devices = [torch.cuda.current_device()] if self.cuda is not None else []
        # fork_rng puts the generators back afterwards: the replay does not shift later randomness.
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda)
            yield


def _chunks(input_ids: torch.Tensor, attention_mask: torch.Tensor, size: int) -> list[tuple[torch.Tensor, ...]]:
    return list(zip(input_ids.split(size), attention_mask.split(size), strict=True))


def embed_without_graph(embed: Embed, chunks: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, list[RngState]]:
    """Step 1: embeddings of every chunk (no graph kept) and the RNG state each chunk started from."""
    states, parts = [], []
    with torch.no_grad():
        for input_ids, attention_mask in chunks:
            states.append(RngState())
            parts.append(embed(input_ids, attention_mask))
    return torch.cat(parts), states


def backpropagate_chunks(embed: Embed, chunks: list[tuple[torch.Tensor, ...]], states: list[RngState],
                         embedding_grad: torch.Tensor) -> None:
    """Step 3: re-embed each chunk with its graph under its recorded RNG state and push the cached
    gradient of its embeddings into the tower's parameters."""
    offset = 0
    for (input_ids, attention_mask), state in zip(chunks, states, strict=True):
        with state.replayed():
            embeddings = embed(input_ids, attention_mask)
        grad = embedding_grad[offset : offset + embeddings.size(0)]
        offset += embeddings.size(0)
        embeddings.backward(grad.to(embeddings.dtype))


def average_gradients_across_ranks(model: torch.nn.Module) -> None:
    """What DDP's reducer does after backward: every rank ends with the mean gradient. Parameters a
    rank did not reach contribute zeros, so every rank reduces the same tensors in the same order."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    world_size = dist.get_world_size()
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad.div_(world_size)


def grad_cache_step(
    dual_encoder: Any,
    inputs: dict[str, torch.Tensor],
    chunk_size: int,
    *,
    loss_divisor: float = 1.0,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> torch.Tensor:
    """One contrastive batch through GradCache; leaves the full-batch gradients (averaged across
    ranks) in the parameters and returns the loss. `dual_encoder` is the unwrapped DualEncoderModel."""
    queries = _chunks(inputs["query_input_ids"], inputs["query_attention_mask"], chunk_size)
    docs = _chunks(inputs["doc_input_ids"], inputs["doc_attention_mask"], chunk_size)
    with autocast():
        query_embeddings, query_states = embed_without_graph(dual_encoder.encode_query, queries)
        doc_embeddings, doc_states = embed_without_graph(dual_encoder.encode_passage, docs)
    query_embeddings = query_embeddings.float().requires_grad_(True)
    doc_embeddings = doc_embeddings.float().requires_grad_(True)
    loss = dual_encoder.loss(query_embeddings, doc_embeddings, inputs.get("doc_keys"), inputs.get("positive_keys"))
    loss = loss / loss_divisor
    backward(loss)
    with autocast():
        backpropagate_chunks(dual_encoder.encode_query, queries, query_states, query_embeddings.grad)
        backpropagate_chunks(dual_encoder.encode_passage, docs, doc_states, doc_embeddings.grad)
    average_gradients_across_ranks(dual_encoder)
    return loss.detach()


class GradCacheTrainer(OrderedLossTrainer):
    """Stage 1's Trainer when `train.grad_cache_chunk` is set: one optimizer step per contrastive
    batch of `batch_size` pairs, encoded `chunk_size` texts at a time."""

    def __init__(self, *args: Any, chunk_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chunk_size = chunk_size

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        dual_encoder = self.accelerator.unwrap_model(model)
        dual_encoder.train()
        return grad_cache_step(
            dual_encoder, self._prepare_inputs(inputs), self.chunk_size,
            loss_divisor=self.current_gradient_accumulation_steps,
            # Through the accelerator, so that fp16's grad scaler scales the cached gradients too.
            backward=self.accelerator.backward,
            autocast=self.compute_loss_context_manager,
        )
