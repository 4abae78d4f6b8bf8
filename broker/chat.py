"""Chat templates in the registry: published once per template by the groups, read by clients.

A group publishes, in its heartbeat, the SHA-256 of its model's chat template (``chat_template``)
and the special tokens' texts; the template's source lives once under ``{p:groups}:template:<sha>``
(content-addressed: every group of a model writes the same key, and an upgrade with a new template
writes a new one). The gateway, the Python client and batch jobs render chat from it, so none of
them needs the model's files.

Models without a tokenizer of their own (``echo``, ``random:<preset>``: byte-level) publish
``PLAIN_CHAT_TEMPLATE``: one ``<role>: <content>`` line per message, then ``assistant:``.
"""

from __future__ import annotations

import hashlib

from redis import Redis

from broker.keys import Keys

PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def template_digest(source: str) -> str:
    """The SHA-256 (64 hex digits) a template is published and looked up under."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def publish_template(redis: Redis, keys: Keys, source: str) -> str:
    """Store ``source`` under its digest (no expiry: it is small, and shared by every group of a
    model); returns the digest."""
    digest = template_digest(source)
    redis.set(keys.chat_template(digest), source.encode("utf-8"))
    return digest


def template_text(raw: bytes | str | None, digest: str) -> str | None:
    """The template read back under ``digest``, or None when it is missing or not what was published."""
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return text if template_digest(text) == digest else None


def read_template(redis: Redis, keys: Keys, digest: str) -> str | None:
    """The template published under ``digest``; None when Redis does not hold it (any more)."""
    return template_text(redis.get(keys.chat_template(digest)), digest)
