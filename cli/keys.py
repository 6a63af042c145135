"""`dit-serve keys create|list|revoke`: manage API keys in the Redis the API uses."""

import argparse
import json
import sys
import time

from dit_serve.keys import ApiKey, KeyExistsError, Priority, create_key, list_keys, revoke_key, webhook_secret

REDIS_HELP = "Redis URL of the API (REDIS_URL)"


def add_keys_parser(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser(
        "create", help="create a key and print its secret and webhook signing secret (shown only once)"
    )
    create.add_argument("name", help="the key's name: 1-64 letters, digits, '.', '_' or '-'")
    create.add_argument("--admin", action="store_true", help="may see and cancel every client's jobs")
    create.add_argument("--rate-per-min", type=int, default=None, help="jobs per minute (default: no limit)")
    create.add_argument(
        "--max-queued", type=int, default=None, help="jobs queued at once (default: no limit)"
    )
    create.add_argument(
        "--max-priority", choices=[p.value for p in Priority], default=None, help="highest job priority"
    )
    create.add_argument("--json", action="store_true", help="print the key as a JSON object")
    listing = actions.add_parser("list", help="list keys (names, admin flag, limits; never secrets)")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    revoke = actions.add_parser("revoke", help="delete a key: requests with it get 401 at once")
    revoke.add_argument("name")
    for action in (create, listing, revoke):
        action.add_argument("--redis-url", dest="redis_url", default=None, help=REDIS_HELP)


def _limits(key: ApiKey) -> str:
    parts = [
        f"{key.rate_per_min}/min" if key.rate_per_min else "",
        f"max {key.max_queued} queued" if key.max_queued else "",
        f"priority <= {key.max_priority}" if key.max_priority else "",
    ]
    return ", ".join(part for part in parts if part) or "no limits"


def run_keys(args: argparse.Namespace, redis_url: str | None) -> None:
    """Run one `dit-serve keys` action against the Redis at `redis_url`."""
    from redis import Redis

    if not redis_url:
        raise SystemExit("dit-serve keys needs --redis-url (or REDIS_URL): the Redis your API uses")
    redis = Redis.from_url(redis_url)
    if args.keys_command == "create":
        try:
            key, secret = create_key(
                redis,
                args.name,
                admin=args.admin,
                rate_per_min=args.rate_per_min,
                max_queued=args.max_queued,
                max_priority=Priority(args.max_priority) if args.max_priority else None,
            )
        except (KeyExistsError, ValueError) as exc:
            raise SystemExit(f"dit-serve keys create: {exc}") from exc
        signing = webhook_secret(redis, key.name)
        if args.json:
            print(json.dumps({**key.model_dump(mode="json"), "key": secret, "webhook_secret": signing}))
        else:
            role = "admin key" if key.admin else "key"
            print(f"Created {role} {key.name!r} ({_limits(key)}). Its secret, shown only this once:")
            print(secret)
            print("Send it as: Authorization: Bearer <key>")
            print("Its webhook signing secret (verify the webhook-signature of its jobs' webhooks with it):")
            print(signing)
    elif args.keys_command == "list":
        keys = list_keys(redis)
        if args.json:
            print(json.dumps([key.model_dump(mode="json") for key in keys]))
            return
        for key in keys:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(key.created_at))
            admin = "admin" if key.admin else "-"
            print(f"{key.name}\t{admin}\t{_limits(key)}\tcreated {created}")
        if not keys:
            print("no keys; create one with `dit-serve keys create NAME`", file=sys.stderr)
    elif not revoke_key(redis, args.name):
        raise SystemExit(f"dit-serve keys revoke: no key named {args.name!r}")
    else:
        print(f"Revoked key {args.name!r}")
