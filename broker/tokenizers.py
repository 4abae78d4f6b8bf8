"""Tokenizers in the registry: published once per tokenizer by the groups, read by the gateway.

Like chat templates (broker.chat), a group publishes in its heartbeat the SHA-256 of its model's
tokenizer (``tokenizer``) and stores the tokenizer itself once under ``{p:groups}:tokenizer:<sha>``
(content-addressed: every group of a model writes the same key, and only when it is missing: a
tokenizer.json is megabytes). The gateway's ``/tokenize`` and ``/detokenize`` load it from there,
so they give the ids the worker groups give, with no model files.

The stored text is JSON: ``{"kind": "tokenizers", "json": "<tokenizer.json>"}`` for a Hugging Face
tokenizer (GGUF files' rebuilt ones included), or ``{"kind": "bytes", "vocab_size": N, "specials":
[ids]}`` for the byte-level tokenizer of ``echo`` and ``random:<preset>`` models.
"""

from __future__ import annotations

import hashlib

from redis import Redis

from broker.keys import Keys


def tokenizer_digest(spec: str) -> str:
    """The SHA-256 (64 hex digits) a tokenizer is published and looked up under."""
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()


def publish_tokenizer(redis: Redis, keys: Keys, spec: str) -> str:
    """Store ``spec`` under its digest unless it is there already (no expiry); returns the digest."""
    digest = tokenizer_digest(spec)
    key = keys.tokenizer(digest)
    if not redis.exists(key):
        redis.set(key, spec.encode("utf-8"))
    return digest


def tokenizer_text(raw: bytes | str | None, digest: str) -> str | None:
    """The tokenizer read back under ``digest``, or None when missing or not what was published."""
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return text if tokenizer_digest(text) == digest else None
