"""Where requests come in: the ingress streams every balancer reads, and what each binds to its requests.

The default source is the shared ``{p}:requests`` with its cancel stream ``{p}:cancel``: any client
that may write it can send, as CONTRACT.md promises (trusted clients, redis-cli users). A tenant
added with ``ryzanstein tenant add <name>`` (a member of ``{p}:tenants``) has a source of its own:
``{p}:t:<name>:requests`` and ``{p}:t:<name>:cancel``. The ACL recipe of docs/OPERATIONS.md
("Tenants") lets the tenant's Redis user write those and no shared stream, so whatever it does to
them (``XADD MAXLEN 0``, an explicit maximal entry id, ``DEL``) touches its own requests only.

The tenant of a request is the source it came from, never a field a client sets: its ``reply_to``
must lie in the tenant's key space (``Keys.tenant_space``), its default reply stream is there, an
entry sent without ``id`` gets the id ``<tenant>:<entry id>`` (entry ids of different streams
meet), and only entries of the tenant's own cancel stream cancel it (broker.cancellation).

Every balancer reads every source, one consumer group (``balancers``) per stream, crash recovery
(XAUTOCLAIM) per stream; one read takes a bounded share of each (``shares``), so a tenant that
floods its stream delays no other. The shards of the shared stream (``Settings.ingress_shards``,
``{p}:requests:<n>``: on a Redis Cluster, ingress spread over the masters) are more entries of the
list ``sources`` returns: shared sources (an entry sent there without ``id`` gets its entry id, as on
``{p}:requests``; entry ids of two shards may meet, so clients of shards send ids, as ours do).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from redis import Redis

from broker.keys import Keys

log = logging.getLogger(__name__)

TENANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # tenant names (Settings.tenant): no ':' nor space


@dataclass(frozen=True, slots=True)
class Source:
    """One ingress stream, its cancel stream, and the tenant its requests belong to (None: shared)."""

    stream: str
    cancel: str
    tenant: str | None = None
    removed: bool = False  # a tenant removed (``{p}:tenants:removed``): its entries are answered, not served

    def default_id(self, entry_id: str) -> str:
        """The request id of an entry sent without ``id``: its entry id, under the tenant's name."""
        return default_request_id(entry_id, self.tenant)


def default_request_id(entry_id: str, tenant: str | None) -> str:
    """``entry_id`` on the shared stream, ``<tenant>:<entry_id>`` on a tenant's (ids stay distinct)."""
    return entry_id if tenant is None else f"{tenant}:{entry_id}"


def sources(keys: Keys, tenants: Iterable[str] = (), removed: Iterable[str] = (), *,
            shards: int = 1) -> list[Source]:
    """The shared source first, then its ingress shards (``shards`` > 1: ``{p}:requests:0`` ..
    ``:shards-1``, cancelled through ``{p}:cancel``), then one per tenant (in the order given), then
    one per ``removed`` tenant that is no tenant now: its stream is still read, so that what was
    sent there before (or is still sent) gets an answer (``invalid_request``) rather than none."""
    tenants = list(tenants)
    return [Source(keys.requests, keys.cancel),
            *(Source(keys.requests_shard(i), keys.cancel) for i in range(shards if shards > 1 else 0)),
            *(Source(keys.tenant_requests(t), keys.tenant_cancel(t), t) for t in tenants),
            *(Source(keys.tenant_requests(t), keys.tenant_cancel(t), t, removed=True)
              for t in removed if t not in tenants)]


def read_tenants(redis: Redis, keys: Keys, *, removed: bool = False) -> list[str]:
    """The tenants in ``{p}:tenants`` (``removed``: in ``{p}:tenants:removed``), sorted; a member that
    is no valid tenant name is skipped (logged)."""
    out = []
    for raw in redis.smembers(keys.tenants_removed if removed else keys.tenants):
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if TENANT_RE.fullmatch(name):
            out.append(name)
        else:
            log.warning("ignoring %r in %s: not a tenant name (%s)", name, keys.tenants, TENANT_RE.pattern)
    return sorted(out)


def tenant_cancels(redis: Redis, keys: Keys) -> dict[str, str]:
    """The tenants' cancel streams, each with its tenant (what a worker group reads besides
    ``{p}:cancel``); a removed tenant's too: its requests in flight can still be cancelled."""
    return {keys.tenant_cancel(t): t for t in (*read_tenants(redis, keys), *read_tenants(redis, keys, removed=True))}


def shares(total: int, streams: int, *, start: int = 0) -> list[int]:
    """Entries to read from each of ``streams`` streams in one read of at most ``total``: an equal
    share each, the remainder (or, with more streams than ``total``, one entry each) going to the
    streams from ``start`` on, so that a rotating ``start`` is fair over reads. Sums to
    ``min(total, ...)``: never more than ``total``."""
    if streams <= 0:
        return []
    base, extra = divmod(max(total, 0), streams)
    out = [base] * streams
    for k in range(extra):
        out[(start + k) % streams] += 1
    return out


def cancel_counts(feeds: list[str], shared: str, total: int) -> list[int]:
    """Cancel entries to read from each of ``feeds`` in one read: ``total`` from the ``shared`` cancel
    stream, and ``total`` shared equally among the tenants' (``shares``, at least one each): the
    cost of a read does not grow with the tenants, and a tenant flooding its cancel stream delays
    its own cancels only."""
    tenants = iter(shares(total, sum(f != shared for f in feeds)))
    return [total if f == shared else max(1, next(tenants)) for f in feeds]


def tenant_acl(keys: Keys, tenant: str, password: str) -> str:
    """The ``ACL SETUSER`` command of docs/OPERATIONS.md ("Tenants") for ``tenant``: read and write
    its own keys (reply streams, ingress and cancel streams, their state companions' reads), nothing
    else; ``XADD`` only where those lie."""
    if not TENANT_RE.fullmatch(tenant):
        raise ValueError(f"tenant names are 1-64 characters of [A-Za-z0-9_.-], got {tenant!r}")
    space = keys.tenant_space(tenant)
    return (f"ACL SETUSER {tenant} on >{password} resetkeys clearselectors ~{space}* %R~{{{space}* "
            "resetchannels -@all +xadd +xread +xrange +xrevrange +xtrim +del +exists +ping +hello")
