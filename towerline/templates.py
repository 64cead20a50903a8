"""How a document's title and text become the one string a doc tower reads.

Encoders trained on "title text" read SciFact best that way; instruction-tuned LLM towers often want
a prompt ("Title: {title}\nPassage: {text}"). The template is saved in the doc tower's spec, so the
index builder renders documents exactly as the tower was trained on them.
"""

from __future__ import annotations

from string import Formatter

DEFAULT_DOC_TEMPLATE = "{title} {text}"
TEMPLATE_FIELDS = frozenset({"title", "text"})


def check_doc_template(template: str) -> str:
    """The template itself, or ValueError naming what is wrong with it."""
    try:
        fields = [field for _, field, _, _ in Formatter().parse(template) if field is not None]
    except ValueError as exc:
        raise ValueError(f"doc template {template!r}: {exc}") from None
    unknown = set(fields) - TEMPLATE_FIELDS
    if unknown or "" in fields:
        raise ValueError(f"doc template {template!r}: only {{title}} and {{text}} may appear, found "
                         f"{sorted(unknown) or ['{}']}")
    if "text" not in fields:
        raise ValueError(f"doc template {template!r} must contain {{text}}")
    return template


def render_document(template: str, title: str, text: str) -> str:
    """Fill the template; surrounding whitespace is stripped (a document may lack a title or text)."""
    return template.format(title=title, text=text).strip()
