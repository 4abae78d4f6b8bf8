"""Every Redis key name ryzanstein uses, built here and nowhere else.

Redis Cluster: a Lua script may only touch keys of one hash slot. Keys that one script touches
together share a hash tag: a per-group key carries ``{<prefix>:g:<name>}``, and the state of a
request lives in a *companion* of its reply stream (``companion``), which hashes to the same slot as
the reply stream itself even though the reply stream's name (fixed by the protocol) has no tag.

Key schema (``p`` is the prefix, ``ryz`` by default):

| key | type | what |
|---|---|---|
| ``p:requests`` | stream | ingress; consumer group ``balancers`` |
| ``p:requests:<n>`` | stream | ingress shard ``n`` (``Settings.ingress_shards`` > 1), read like ``p:requests`` |
| ``p:cancel`` | stream | cancellations, read by every balancer and group |
| ``p:result:<id>`` | stream | default reply stream of request ``<id>`` |
| ``{<reply>}:state:<id>`` | hash | owner group, epoch, tokens published, final flag (companion of the reply) |
| ``{<reply>}:gen:<id>`` | string | token ids published so far, ``"id,id,"`` (until the final event) |
| ``{<reply>}:gentext:<id>`` | string | text published so far: the joined token deltas (until the final event) |
| ``p:groups`` | zset | registered groups, scored by last heartbeat (ms, Redis clock) |
| ``{p:groups}:info:<name>`` | hash | a group's heartbeat: load, limits, identity |
| ``{p:groups}:template:<sha256>`` | string | a chat template's source, under its digest (broker.chat) |
| ``{p:g:<name>}:queue`` | stream | a group's work queue; consumer group ``group`` |
| ``{p:g:<name>}:tokens`` | string | tokens (prompt + max_tokens) of the entries in the group's queue |
| ``{p:g:<name>}:accepting`` | string | present while the group takes new work |
| ``{p:g:<name>}:seen:<id>:<epoch>`` | string | dispatch marker: makes routing idempotent |
| ``{p:g:<name>}:failover`` | string | lock held by the balancer failing a dead group over |
| ``p:id:<id>`` | string | the ingress entry that used request id ``<id>`` first, and its reply stream |
| ``p:dead`` | stream | dead letters: entries that could not be handled, with the reason |
| ``p:signing-key`` | string | HMAC key signing the internal fields of requests put back on ingress (broker.signing) |
| ``p:balancers`` | zset | balancers, scored by their last stats write (ms) |
| ``p:balancer:<name>`` | hash | a balancer's stats: batch-size histogram, counts, failovers |
| ``p:client:<uuid>`` | stream | shared reply stream of one client instance |
| ``p:tenants`` | set | tenants with an ingress stream of their own (``ryzanstein tenant add``) |
| ``p:tenants:removed`` | set | tenants removed: balancers answer what is left on their streams |
| ``p:t:<tenant>:requests`` | stream | a tenant's ingress; consumer group ``balancers`` (broker.sources) |
| ``p:t:<tenant>:cancel`` | stream | a tenant's cancellations: they end that tenant's requests only |
| ``p:t:<tenant>:...`` | stream | reply streams of a tenant's clients (``result:<id>``, ``client:<uuid>``) |
| ``p:batch:<job>:replies`` | stream | reply stream of the requests of one batch job |

RQ keeps batch jobs under its own ``rq:`` keys; the name of their queue (``p:batch``) is built here.
"""

from __future__ import annotations

import binascii
import itertools
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

INGRESS_GROUP = "balancers"
# The suffixes of a request's state keys (Keys.state, generated, generated_text): see companion.
_COMPANION = re.compile(r":(state|gen|gentext):")
QUEUE_GROUP = "group"
CLUSTER_SLOTS = 16384


def hash_tag(key: str) -> str | None:
    """The part of ``key`` Redis Cluster hashes, if the key has a non-empty ``{...}`` tag."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1 : end]


def key_slot(key: str) -> int:
    """The Redis Cluster hash slot of ``key``: CRC16/XMODEM of its hash tag, or of the whole key."""
    return binascii.crc_hqx((hash_tag(key) or key).encode(), 0) % CLUSTER_SLOTS


@lru_cache(maxsize=1024)
def _slot_tag(slot: int) -> str:
    """The shortest tag of ``[0-9a-z]`` that hashes to ``slot`` (four characters reach every slot)."""
    for size in itertools.count(1):
        for chars in itertools.product("0123456789abcdefghijklmnopqrstuvwxyz", repeat=size):
            if binascii.crc_hqx("".join(chars).encode(), 0) % CLUSTER_SLOTS == slot:
                return "".join(chars)
    raise AssertionError("unreachable")


def companion(key: str, suffix: str) -> str:
    """A key in the same cluster hash slot as ``key``.

    A key without a tag hashes as a whole, so ``{key}`` as a tag lands in the same slot; a key
    that already has a tag keeps it. A '}' in an untagged key (``replies}1``, ``a{}b``) would end
    a ``{key}`` tag early, so such a key gets a short tag of its slot instead: ``{<tag>}:key:suffix``.
    """
    if hash_tag(key) is not None:
        return f"{key}:{suffix}"
    if key and "}" not in key:
        return f"{{{key}}}:{suffix}"
    return f"{{{_slot_tag(key_slot(key))}}}:{key}:{suffix}"


class Progress(NamedTuple):
    """A request's keys that CLAIM_OWNER and PUBLISH read and write (``Keys.progress``): its state hash
    and, for a new owner to continue from, the token ids and text it has published. A caller that
    passes no ``generated`` keys gets the scripts' older behaviour: nothing is recorded."""

    state: str
    generated: str | None = None
    generated_text: str | None = None


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix."""

    prefix: str = "ryz"

    @property
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}:cancel"

    def result(self, request_id: str) -> str:
        return f"{self.prefix}:result:{request_id}"

    @property
    def tenants(self) -> str:
        """The tenants whose ingress streams every balancer reads (broker.sources)."""
        return f"{self.prefix}:tenants"

    @property
    def tenants_removed(self) -> str:
        """Tenants removed (``ryzanstein tenant remove``): their streams are read to answer what is left."""
        return f"{self.prefix}:tenants:removed"

    def requests_shard(self, index: int) -> str:
        """Ingress shard ``index`` (Settings.ingress_shards): one more stream every balancer reads."""
        return f"{self.prefix}:requests:{index}"

    def tenant_requests(self, tenant: str) -> str:
        """A tenant's own ingress stream: its requests, and only its, come in there."""
        return f"{self.tenant_space(tenant)}requests"

    def tenant_cancel(self, tenant: str) -> str:
        """A tenant's own cancel stream: its entries end that tenant's requests only."""
        return f"{self.tenant_space(tenant)}cancel"

    @staticmethod
    def state(reply_key: str, request_id: str) -> str:
        """State of one request; per request, since several requests may share a reply stream."""
        return companion(reply_key, f"state:{request_id}")

    @staticmethod
    def generated(reply_key: str, request_id: str) -> str:
        """Token ids a streamed request has published so far: what a new owner continues from."""
        return companion(reply_key, f"gen:{request_id}")

    @staticmethod
    def generated_text(reply_key: str, request_id: str) -> str:
        """The text a streamed request has published so far (its joined token deltas)."""
        return companion(reply_key, f"gentext:{request_id}")

    @staticmethod
    def progress(reply_key: str, request_id: str) -> Progress:
        """State, generated ids and generated text of one request: the keys CLAIM_OWNER reads."""
        return Progress(Keys.state(reply_key, request_id), Keys.generated(reply_key, request_id),
                        Keys.generated_text(reply_key, request_id))

    @property
    def groups(self) -> str:
        return f"{self.prefix}:groups"

    def group_info(self, name: str) -> str:
        return companion(self.groups, f"info:{name}")

    def chat_template(self, digest: str) -> str:
        """A chat template's Jinja source, under its SHA-256 (broker.chat)."""
        return companion(self.groups, f"template:{digest}")

    def tokenizer(self, digest: str) -> str:
        """A model's tokenizer (broker.tokenizers), under its SHA-256."""
        return companion(self.groups, f"tokenizer:{digest}")

    def group_queue(self, name: str) -> str:
        return f"{{{self.prefix}:g:{name}}}:queue"

    def group_queue_tokens(self, name: str) -> str:
        return f"{{{self.prefix}:g:{name}}}:tokens"

    def group_accepting(self, name: str) -> str:
        return f"{{{self.prefix}:g:{name}}}:accepting"

    def group_failover_lock(self, name: str) -> str:
        return f"{{{self.prefix}:g:{name}}}:failover"

    def dispatch_marker(self, group: str, request_id: str, epoch: int) -> str:
        return f"{{{self.prefix}:g:{group}}}:seen:{request_id}:{epoch}"

    def request_id(self, request_id: str) -> str:
        """Who holds a request id: the ingress entry that used it first, and its reply stream."""
        return f"{self.prefix}:id:{request_id}"

    @property
    def dead(self) -> str:
        """Dead letters: entries given up after bounded attempts (broker.dead_letter)."""
        return f"{self.prefix}:dead"

    @property
    def signing_key(self) -> str:
        """The key that signs requests the pipeline puts back on the ingress stream (broker.signing)."""
        return f"{self.prefix}:signing-key"

    @property
    def balancers(self) -> str:
        return f"{self.prefix}:balancers"

    def balancer_stats(self, name: str) -> str:
        return f"{self.prefix}:balancer:{name}"

    def is_internal(self, key: str) -> bool:
        """Whether ``key`` is one of ryzanstein's own keys (never a valid ``reply_to``)."""
        own = (self.requests, self.cancel, self.groups, self.balancers, self.dead, self.signing_key, self.tenants,
               self.tenants_removed)
        tenants = f"{self.prefix}:t:"
        if key.startswith(tenants):  # a tenant's ingress and cancel streams (no ':' in tenant names)
            return key[len(tenants):].partition(":")[2] in ("requests", "cancel")
        return key in own or key.startswith((f"{{{self.groups}}}:", f"{{{self.prefix}:g:", f"{self.requests}:",
                                             f"{self.prefix}:balancer:", f"{self.prefix}:id:"))

    def reply_to_problem(self, key: str, request_id: str, *, tenant: str | None = None) -> str | None:
        """Why ``key`` may not be the reply stream of request ``request_id``; None when it may.

        A request of ``tenant`` (one that came in on the tenant's own ingress stream) replies only
        inside the tenant's space (``tenant_space``): the only keys its client may read; a request of
        no tenant never replies under any tenant's space (nor its companions' ``{<space>``).

        Never one of the pipeline's own keys (``is_internal``), never the state of a request (a
        companion: ``state``, ``generated``, ``generated_text``, under anyone's reply stream), never
        the default result stream of another request (``{p}:result:<id>``, or a tenant's
        ``{p}:t:<tenant>:result:<id>``), nor RQ's keys (batch jobs). Any other stream
        name (or a key that does not exist yet) is the client's to choose.
        """
        if self.is_internal(key) or key.startswith("rq:"):
            return "must not be one of ryzanstein's own keys"
        if tenant is not None and not key.startswith(self.tenant_space(tenant)):
            return f"must name a stream of this request's tenant (under {self.tenant_space(tenant)!r})"
        if tenant is None and key.startswith((f"{self.prefix}:t:", f"{{{self.prefix}:t:")):
            # a tenant reads these (its user's keys): only its own requests write there
            return f"must not name a tenant's key (under {self.prefix + ':t:'!r}): only its own requests reply there"
        if hash_tag(key) is not None and _COMPANION.search(key):
            return "must not be the state of a request"
        if len(key) > 2 and key[0] == "{" and key[-1] == "}" and hash_tag(key) == key[1:-1]:
            # companion("{K}", s) == companion("K", s): it would share the state keys of stream K
            return f"must not be a hash tag alone ({key!r} shares its state keys with {key[1:-1]!r})"
        results = f"{self.prefix}:result:"
        if key.startswith(results) and key != self.result(request_id):
            return f"must not be another request's result stream (only {self.result(request_id)!r} under {results!r})"
        tenants = f"{self.prefix}:t:"
        if key.startswith(tenants) and ":result:" in key[len(tenants):] and not key.endswith(f":result:{request_id}"):
            # a tenant's default result streams (reply_stream(id, tenant=...)): the request's own only
            return f"must not be another request's result stream (a tenant's end in ':result:{request_id}')"
        return None

    def tenant_space(self, tenant: str) -> str:
        """The key prefix of one tenant's reply streams: its Redis user may read nothing else."""
        return f"{self.prefix}:t:{tenant}:"

    def reply_stream(self, request_id: str, *, tenant: str | None = None) -> str:
        """Where a client's request replies by default: its own result stream, in its tenant's space."""
        return self.result(request_id) if tenant is None else f"{self.tenant_space(tenant)}result:{request_id}"

    def client_replies(self, client_id: str, *, tenant: str | None = None) -> str:
        if tenant is not None:
            return f"{self.tenant_space(tenant)}client:{client_id}"
        return f"{self.prefix}:client:{client_id}"

    @property
    def batch_queue(self) -> str:
        """The name of the RQ queue of batch jobs (RQ stores it as ``rq:queue:<name>``)."""
        return f"{self.prefix}:batch"

    def batch_replies(self, job_id: str) -> str:
        """Where the requests of one batch job reply; the same across retries of the job."""
        return f"{self.prefix}:batch:{job_id}:replies"
