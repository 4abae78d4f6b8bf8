"""``ryzanstein tenant add|remove|list``: the tenants with ingress streams of their own (broker.sources).

``add NAME`` puts NAME in ``{p}:tenants`` (every balancer reads ``{p}:t:NAME:requests`` and every
balancer and worker group ``{p}:t:NAME:cancel`` within ``groups_refresh_s``) and prints the
``ACL SETUSER`` command of docs/OPERATIONS.md ("Tenants") that gives NAME's Redis user its own keys
and nothing else; ``--apply`` runs it too (the URL's user needs ``ACL`` rights). ``remove NAME``
moves NAME from the set to ``{p}:tenants:removed``: its requests are no longer served, but balancers
still read its stream and answer every entry found there (left over, pending on a balancer that
died, or sent since) with ``invalid_request``, so that none is lost without a word; with
``--apply`` it also deletes NAME's Redis user (nothing more comes in). ``list`` prints the tenants, one a line.
"""

from __future__ import annotations

import argparse
import secrets

from broker.cli_common import settings_from_args
from broker.connection import connect, resolve_url
from broker.errors import ConfigError
from broker.keys import Keys
from broker.sources import TENANT_RE, read_tenants, tenant_acl


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["add", "remove", "list"], help="what to do")
    parser.add_argument("name", nargs="?", default=None, help="the tenant (1-64 characters of [A-Za-z0-9_.-])")
    parser.add_argument("--password", default=None,
                        help="the tenant's Redis password for the printed ACL command (default: a random one)")
    parser.add_argument("--apply", action="store_true",
                        help="also run ACL SETUSER (add) or ACL DELUSER (remove) on the server")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if args.action != "list" and (args.name is None or not TENANT_RE.fullmatch(args.name)):
        raise ConfigError(f"tenant {args.action} needs a NAME of 1-64 characters of [A-Za-z0-9_.-], got {args.name!r}")
    if args.apply and args.name == "default":
        raise ConfigError("tenant 'default' cannot be applied: it would rewrite Redis's default user")
    if args.password is not None and (not args.password or any(c.isspace() for c in args.password)):
        raise ConfigError("--password must be non-empty, without spaces")
    keys = Keys(settings.prefix)
    redis = connect(resolve_url(settings), settings)
    try:
        if args.action == "list":
            for name in read_tenants(redis, keys):
                print(name)
        elif args.action == "add":
            command = tenant_acl(keys, args.name, args.password or secrets.token_urlsafe(24))
            if args.apply:
                redis.execute_command(*command.split())
            redis.sadd(keys.tenants, args.name)
            redis.srem(keys.tenants_removed, args.name)
            print(command)
        else:
            redis.srem(keys.tenants, args.name)
            redis.sadd(keys.tenants_removed, args.name)
            if args.apply:
                redis.acl_deluser(args.name)
            print(f"ACL DELUSER {args.name}")
    finally:
        redis.close()
    return 0
