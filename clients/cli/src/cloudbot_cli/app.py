"""`cloudbot`: sign in once, then list, create, stop, start, delete and watch your machines,
open their desktop and manage your provider keys. Tables for people; `--json` for scripts."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
import uuid
import webbrowser
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from cloudbot_cli import config
from cloudbot_cli.api import Api, ApiError

INSTANCE_COLUMNS = ("id", "name", "size", "state", "desktop", "agent", "created_at")
# What `--wait` waits for after each command.
SETTLES_IN = {"create": "running", "start": "running", "stop": "stopped", "delete": "terminated"}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result: int = args.run(args)
    except ApiError as exc:
        print(f"error: {exc.detail} ({exc.code})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloudbot", description=__doc__)
    parser.add_argument("--api", help="API URL (default: $CLOUDBOT_API_URL or the saved one)")
    parser.add_argument("--json", action="store_true", help="print JSON, for scripts")
    sub = parser.add_subparsers(required=True, metavar="command")
    # `--json` is taken after the command too (`cloudbot list --json`).
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", default=argparse.SUPPRESS)

    def command(name: str, run: Callable[[argparse.Namespace], int], help_: str) -> Any:
        p = sub.add_parser(name, help=help_, description=help_, parents=[json_flag])
        p.set_defaults(run=run)
        return p

    p = command("signup", _signup, "create an account")
    p.add_argument("--email")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p = command("login", _login, "sign in and keep a personal access token for this machine")
    p.add_argument("--email")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--token", help="use this personal access token instead of a password")
    command("logout", _logout, "forget the saved token")

    p = command("list", _list, "your machines")
    p.add_argument("--all", action="store_true", help="include terminated machines")
    p = command("show", _show, "one machine")
    p.add_argument("instance")

    p = command("create", _create, "create a machine")
    p.add_argument("name")
    p.add_argument("--size", help="one of `cloudbot sizes` (default: the operator's default)")
    p.add_argument("--idle-stop-minutes", type=int, help="stop after this long idle (0: never)")
    p.add_argument("--wait", action="store_true", help="wait until it is running")
    for verb, help_ in (
        ("stop", "stop a machine, keeping its disk"),
        ("start", "start a stopped machine"),
        ("delete", "delete (terminate) a machine; its disk is gone"),
    ):
        p = command(verb, _act, help_)
        p.add_argument("instance")
        p.add_argument("--wait", action="store_true", help="wait until it has settled")
        p.set_defaults(verb=verb)

    p = command("events", _events, "a machine's state changes")
    p.add_argument("instance")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new ones")

    p = command("open", _open, "open the machine's desktop in the web console")
    p.add_argument("instance")
    p.add_argument("--print", action="store_true", help="print the URL, do not open a browser")
    p.add_argument("--ticket", choices=("vnc", "cloudbot"), help="print a one-time gateway URL")

    command("sizes", _sizes, "the sizes on offer")

    p = command("keys", _keys, "your provider API keys (masked)")
    keys = p.add_subparsers(dest="keys_command", metavar="action")
    keys.add_parser("list", help="list them (the default)", parents=[json_flag])
    add = keys.add_parser(
        "set", help="store or replace a key (read from stdin)", parents=[json_flag]
    )
    add.add_argument("provider")
    remove = keys.add_parser("remove", help="forget a key", parents=[json_flag])
    remove.add_argument("provider")
    return parser


def _api(args: argparse.Namespace, need_token: bool = True) -> Api:
    creds = config.load(args.api)
    if need_token and not creds.token:
        raise ApiError(401, "not_signed_in", "Not signed in: run `cloudbot login` first.")
    return Api(creds.api_url, creds.token)


def _ask_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return getpass.getpass("Password: ")


def _signup(args: argparse.Namespace) -> int:
    email = args.email or input("Email: ")
    password = _ask_password(args)
    with _api(args, need_token=False) as api:
        user = api.call("POST", "/auth/signup", json={"email": email, "password": password})
    _say(args, user, f"Account {user['email']} created; now run `cloudbot login`.")
    return 0


def _login(args: argparse.Namespace) -> int:
    creds = config.load(args.api)
    if args.token:
        with Api(creds.api_url, args.token) as api:
            api.instances()  # proves the token works before it is saved
        token = args.token
    else:
        email = args.email or input("Email: ")
        password = _ask_password(args)
        with Api(creds.api_url) as api:
            access = api.login(email, password)
            try:
                created = api.create_token(
                    access, f"cloudbot CLI on {socket.gethostname()}", "write"
                )
            finally:
                api.logout(access)  # the CLI keeps only the revocable token
        token = created["token"]
    path = config.save(config.Credentials(creds.api_url, token))
    _say(args, {"api_url": creds.api_url, "credentials": str(path)}, f"Signed in; token in {path}.")
    return 0


def _logout(args: argparse.Namespace) -> int:
    forgot = config.forget()
    _say(args, {"forgot": forgot}, "Token forgotten." if forgot else "Was not signed in.")
    return 0


def _list(args: argparse.Namespace) -> int:
    with _api(args) as api:
        rows = api.instances(include_terminated=args.all)
    if args.json:
        _json(rows)
    else:
        _table([_instance_row(r) for r in rows], INSTANCE_COLUMNS)
    return 0


def _show(args: argparse.Namespace) -> int:
    with _api(args) as api:
        row = api.instance(args.instance)
    if args.json:
        _json(row)
    else:
        _table([_instance_row(row)], INSTANCE_COLUMNS)
    return 0


def _create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.size:
        body["size"] = args.size
    if args.idle_stop_minutes is not None:
        body["idle_stop_minutes"] = args.idle_stop_minutes
    with _api(args) as api:
        # One key per invocation: a retry inside this run cannot make a second machine.
        row = api.create(body, idempotency_key=f"cli-{uuid.uuid4()}")
        return _settle(args, api, row, "create", after=None)


def _act(args: argparse.Namespace) -> int:
    with _api(args) as api:
        # Waiting starts after what already happened, so an earlier `running` is not taken
        # for the one this command leads to.
        after = api.last_event_id(args.instance) if args.wait else None
        row = api.command(args.instance, args.verb)
        return _settle(args, api, row, args.verb, after=after)


def _settle(
    args: argparse.Namespace, api: Api, row: dict[str, Any], verb: str, *, after: int | None
) -> int:
    if not args.wait:
        if args.json:
            _json(row)
        else:
            print(f"{row['id']} {row['state']}")
        return 0
    wanted = SETTLES_IN[verb]
    state = row["state"]
    for event in api.wait_for(str(row["id"]), {wanted}, after):
        if event["event"] == "state":
            state = event["state"]
            if not args.json:
                print(f"{row['id']} {state}" + (f" ({event['reason']})" if event["reason"] else ""))
    final = api.instance(str(row["id"])) if wanted != "terminated" else {**row, "state": state}
    if args.json:
        _json(final)
    return 0 if state == wanted else 1


def _events(args: argparse.Namespace) -> int:
    with _api(args) as api:
        for event in api.events(args.instance, follow=args.follow):
            if args.json:
                print(json.dumps(event), flush=True)
            elif event["event"] == "state":
                reason = f" ({event['reason']})" if event.get("reason") else ""
                print(f"{event['at']}  {event['state']}{reason}", flush=True)
            else:
                print(f"{event.get('at', '')}  {event['event']}: {event}", flush=True)
    return 0


def _open(args: argparse.Namespace) -> int:
    with _api(args) as api:
        api.instance(args.instance)  # a clear error for an unknown machine
        if args.ticket:
            url = api.ticket(args.instance, args.ticket)["url"]
        else:
            url = f"{api.base_url}/app/#/desktop/{args.instance}"
    if args.print or args.ticket or args.json or not _has_browser():
        _say(args, {"url": url}, url)
    else:
        webbrowser.open(url)
        print(f"Opened {url}")
    return 0


def _has_browser() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("BROWSER") or sys.platform == "darwin")


def _sizes(args: argparse.Namespace) -> int:
    with _api(args, need_token=False) as api:
        rows = api.sizes()
    if args.json:
        _json(rows)
    else:
        _table(rows, tuple(rows[0]) if rows else ("name",))
    return 0


def _keys(args: argparse.Namespace) -> int:
    action = args.keys_command or "list"
    with _api(args) as api:
        if action == "set":
            key = (
                sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("Key: ")
            )
            row = api.set_key(args.provider, key)
            _say(args, row, f"Stored the {args.provider} key ({row['hint']}).")
        elif action == "remove":
            api.remove_key(args.provider)
            _say(args, {"removed": args.provider}, f"Forgot the {args.provider} key.")
        else:
            rows = api.keys()
            if args.json:
                _json(rows)
            else:
                _table(rows, ("provider", "hint", "updated_at"))
    return 0


def _instance_row(row: dict[str, Any]) -> dict[str, Any]:
    health = row.get("health") or {}
    return {**row, "desktop": _up(health.get("desktop")), "agent": _up(health.get("agent"))}


def _up(value: bool | None) -> str:
    return "-" if value is None else ("up" if value else "down")


def _table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _say(args: argparse.Namespace, value: Any, text: str) -> None:
    if args.json:
        _json(value)
    else:
        print(text)
