"""``mlgate`` (or ``python -m mlgate``): the command line (serve, log, keys, quality, check-config)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mlgate.config import Settings, SettingsError, load_settings
from mlgate.service.cli import keys as keys_command
from mlgate.service.cli import quality as quality_command
from mlgate.service.cli.arguments import whole_number
from mlgate.service.cli.redaction import redact_url, redacted

__all__ = ["main", "redact_url", "redacted"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlgate",
        description="mlgate: validated ingestion to Kafka and batched ONNX prediction.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP service (settings from MLGATE_* env)")
    serve.add_argument("--host", help="bind address (MLGATE_HOST)")
    serve.add_argument("--port", type=int, help="port (MLGATE_PORT or PORT)")
    serve.add_argument(
        "--workers",
        type=int,
        help="serving processes on one port, SO_REUSEPORT (MLGATE_WORKERS or WEB_CONCURRENCY)",
    )
    serve.add_argument("--dev", action="store_true", help="local development defaults")

    log_cmd = commands.add_parser("log", help="read the embedded local log")
    log_actions = log_cmd.add_subparsers(dest="action", metavar="ACTION", required=True)
    tail = log_actions.add_parser("tail", help="print the last records as JSON lines")
    # Bounded: a deque takes no more (a review: 2**63 was a traceback).
    tail.add_argument("-n", type=whole_number(0, 2**62), default=10, help="how many records (default 10)")
    cat = log_actions.add_parser("cat", help="print every record from an offset as JSON lines")
    cat.add_argument("--from-offset", type=whole_number(0, 2**62), default=0)
    for action in (tail, cat):
        action.add_argument("--data-dir", help="data directory (default MLGATE_DATA_DIR)")

    keys_command.add_parser(commands)
    quality_command.add_parser(commands)

    check = commands.add_parser(
        "check-config", help="validate the environment's settings and print them"
    )
    rendered = check.add_mutually_exclusive_group()
    rendered.add_argument(
        "--env-example", action="store_true", help="print every variable with its default"
    )
    rendered.add_argument(
        "--markdown", action="store_true", help="print the README's configuration table"
    )
    return parser


def serving_refusal(settings: Settings, workers_flag: bool = False) -> str | None:
    """Why these settings cannot serve, though each value is valid; None if they can.
    Several processes without Redis would each keep their own Idempotency-Keys and
    record ids: a repeat the kernel hands to another process runs again (a review:
    written twice)."""
    if settings.workers > 1 and settings.redis_url is None and not settings.per_process_state:
        # Named as the operator set it: a PaaS sets WEB_CONCURRENCY, a unit file may
        # pass --workers (reviews).
        paas = "WEB_CONCURRENCY" in os.environ and "MLGATE_WORKERS" not in os.environ
        named = "--workers " if workers_flag else "WEB_CONCURRENCY=" if paas else "MLGATE_WORKERS="
        return (
            f"{named}{settings.workers} without REDIS_URL: each process would keep "
            "its own idempotency keys, record dedup and rate limits, so a repeat reaching "
            "another process runs again; set REDIS_URL, or MLGATE_PER_PROCESS_STATE=true "
            "to accept that"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config" and (args.env_example or args.markdown):
        from mlgate.config import reference

        return _printed(reference.env_example() if args.env_example else reference.markdown_table())
    overrides = {
        name: value
        for name in ("host", "port", "workers")
        if (value := getattr(args, name, None)) is not None
    }
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(f"mlgate: configuration error: {exc}", file=sys.stderr)
        return 2
    refusal = serving_refusal(settings, workers_flag="workers" in overrides)
    if refusal is not None and args.command in (None, "serve", "check-config"):
        print(f"mlgate: configuration error: {refusal}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        import msgspec

        return _printed(msgspec.json.format(msgspec.json.encode(redacted(settings))).decode() + "\n")
    if args.command == "log":
        from mlgate.service.cli.log import print_log

        return print_log(args.data_dir or settings.data_dir, args.action, args)
    if args.command == "keys":
        return keys_command.run(settings, args)
    if args.command == "quality":
        return quality_command.run(settings, args)
    if args.command in (None, "serve"):
        from mlgate.service.http.logs import configure_logging
        from mlgate.service.process.server import run, setting_behind
        from mlgate.service.process.supervisor import Supervisor
        from mlgate.service.protection.api_keys import KeysFileError

        configure_logging(settings.log_level)
        if getattr(args, "dev", False):
            try:
                keys_command.ensure_dev_key(settings)
            except (OSError, KeysFileError) as exc:  # as the server's own start-up errors
                print(f"mlgate: start-up error: {setting_behind(exc, settings)}: {exc}", file=sys.stderr)
                return 2
        if settings.workers > 1:
            return Supervisor(settings).run()
        return run(settings)
    return 2


def _printed(text: str) -> int:
    """``text`` on stdout; a reader gone (``| head``) ends it quietly, as ``cat``, not
    with a traceback and status 1 (a review). Stdout then points at /dev/null, so the
    interpreter's own flush at exit fails no more."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
