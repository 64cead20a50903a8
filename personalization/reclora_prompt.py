"""RecLoRA's Long-Short Modality Retriever and the LLM's prompt.

The CRM reads the long ID history (up to rec.data.long_history items); the LLM's prompt gets a
short text history — a few of those items, with titles and the user's ratings. RecLoRA picks them by
semantic relevance to the target item (cosine of their title embeddings from the text tower) rather
than by recency, so that a long history's relevant behaviour reaches a short prompt; the picked
items keep their chronological order. "recent" mode (the last items) is the ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ShortHistoryMode = Literal["relevant", "recent"]
ANSWER_YES, ANSWER_NO = " Yes", " No"


def pick_short_history(long_history: Sequence[int], target: int, title_vectors: np.ndarray, size: int,
                       mode: ShortHistoryMode) -> list[int]:
    """`size` items of `long_history` (item indexes, oldest first), oldest first.

    relevant: the items whose titles are closest to the target's (`title_vectors` rows are
    L2-normalised); ties go to the more recent item. recent: the last `size` items.
    """
    items = list(long_history)
    if len(items) <= size:
        return items
    if mode == "recent":
        return items[-size:]
    similarity = title_vectors[items] @ title_vectors[target]
    # Sorting by (-similarity, -position): the most similar first, the latest among equals.
    order = np.lexsort((-np.arange(len(items)), -similarity))[:size]
    return [items[position] for position in sorted(order)]


@dataclass(frozen=True)
class PromptItem:
    title: str
    rating: float | None  # None: an implicit interaction (a click) with no rating


def build_prompt(history: Sequence[PromptItem], target_title: str) -> str:
    """The question the LLM answers with " Yes" or " No" (RecLoRA's / TALLRec's CTR prompt shape)."""
    if history:
        lines = [f"- {item.title}" + (f" (rated {item.rating:g})" if item.rating is not None else "")
                 for item in history]
        past = "The user watched:\n" + "\n".join(lines)
    else:
        past = "The user has no history yet."
    return (f"{past}\nWill the user like \"{target_title}\"? Answer Yes or No.\nAnswer:")
