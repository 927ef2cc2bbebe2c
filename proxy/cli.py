"""``hookproxy serve | check | plugins | init | reload | tail | new-plugin``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from proxy.config import (
    BUILTIN_SOURCE,
    Config,
    ConfigError,
    available_providers,
    load_config,
    packaged_text,
)
from proxy.server import GatewayServer

if TYPE_CHECKING:
    from proxy.plugins import PluginHost
    from proxy.server import Gateway

log = structlog.get_logger("hookproxy")


def configure_logging(level: int = logging.INFO, worker: int | None = None) -> None:
    """The app log on stderr; under ``serve --workers``, each line of a worker names it
    (``worker=2``: its index, as in its log file ``requests-2.jsonl``, and its pid)."""
    processors: list[Any] = [structlog.processors.add_log_level,
                             structlog.processors.TimeStamper(fmt="iso")]
    if worker is not None:
        processors.append(_WorkerField(worker, os.getpid()))
    structlog.configure(
        processors=[
            *processors,
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class _WorkerField:
    """Names the worker on each of its log lines."""

    def __init__(self, index: int, pid: int) -> None:
        self.index, self.pid = index, pid

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("worker", self.index)
        event.setdefault("pid", self.pid)
        return event


def _fail(message: str) -> int:
    print(f"hookproxy: error: {message}", file=sys.stderr)
    return 2


class _Server(GatewayServer):
    """uvicorn re-raises SIGTERM after a graceful shutdown, so the process would die by the
    signal; a proxy that drained cleanly should exit 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._hangup)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


    def _hangup(self, signum: int, frame: object) -> None:
        # SIGHUP: re-read the config on the event loop, between requests.
        asyncio.get_running_loop().call_soon(self.reload_config)

    def reload_config(self) -> None:
        try:
            self.gateway.reload(load_config(self.gateway.config.source))
        except ConfigError as exc:
            log.warning("reload refused; the old config keeps serving", error=str(exc))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> int:

    from proxy.server import Gateway
    from proxy.workers import run_workers, shared_state_problem, worker_count

    try:
        config = load_config(args.config)
        gateway = Gateway(config)
    except ConfigError as exc:
        return _fail(str(exc))
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    if not _is_loopback(host) and not config.auth.keys and not (
            config.server.allow_unauthenticated or args.allow_unauthenticated):
        return _fail(f"{config.source}: refusing to listen on {host} with no [auth] keys: "
                     "anyone who can reach it could spend your provider accounts. Configure "
                     "[auth.keys], or pass --allow-unauthenticated (or set "
                     "[server].allow_unauthenticated = true) if that is what you want.")
    workers = worker_count(config, args.workers)
    problem = shared_state_problem(config, workers)
    if problem:
        return _fail(problem)
    for name, why in gateway.skipped.items():
        log.warning("provider skipped", provider=name, reason=why)
    if config.source == BUILTIN_SOURCE:
        log.info("no config.toml here: running on the built-in default (the mock provider, "
                 "model mock-1, loopback only); `hookproxy init` writes an annotated "
                 "config.toml to start from")
    log.info("hookproxy listening", url=f"http://{host}:{port}", config=config.source,
             providers=sorted(gateway.providers), models=gateway.router.model_names(),
             plugins=sorted(gateway.host.enabled),
             classifiers=sorted(gateway.host.enabled_classifiers), workers=workers)
    if not config.server.allowed_hosts and host in ("0.0.0.0", "::", ""):
        log.warning("listening on all interfaces with no [server].allowed_hosts: any Host "
                    "header is served; list the names clients use to refuse the others")
    if workers > 1:
        if not config.store.url:
            log.warning("workers without [store]: each keeps its own cooldowns and latency "
                        "averages, and each dashboard viewer sees one worker's traffic")
        return run_workers(config, workers, host, port)
    return run_server(config, host, port, gateway=gateway)


def run_server(config: Config, host: str, port: int, *, gateway: Gateway | None = None,
               sockets: list[socket.socket] | None = None, supervised: bool = False) -> int:
    """Serves ``config`` in this process until SIGTERM; under ``hookproxy serve --workers``
    (``supervised``), a reload through /admin/reload reaches every worker."""
    from proxy.connections import uvicorn_config
    from proxy.server import Gateway, create_app

    gateway = gateway or Gateway(config)
    gateway.bind_host = host
    if supervised:
        gateway.reload_all = functools.partial(os.kill, os.getppid(), signal.SIGHUP)
    server_config = uvicorn_config(create_app(gateway), config.server, gateway.rejected,
                                   host=host, port=port, timeout_graceful_shutdown=10)
    server = _Server(server_config, gateway)
    _tune_memory()
    server.run(sockets=sockets)
    if gateway.startup_error:
        return _fail(f"not serving: {gateway.startup_error}")
    return 0 if server.started else 1


def _tune_memory() -> None:
    """Two settings for a process that handles many requests of hundreds of KB.

    Fewer cycle collections: a 200 KB request decodes into thousands of containers, and
    with CPython's default threshold (700 more allocated than freed) each one set off
    several young-generation collections, about 1.7 ms of every such request. Requests
    leave no cycles (tests/test_bounds.py checks that failed ones do not), so reference
    counting frees them; the collector runs every 200,000, which bounds what cycles can
    hold. At 50,000, fifty agent requests in flight kept it running every hundred or so
    requests, 30 ms each time, scanning the live requests. What is loaded by now (modules,
    config, plugins) lives as long as the process: ``freeze`` keeps full collections from
    walking it.

    glibc's malloc gives a block of a few hundred KB (a body, its encoding) back to the
    kernel when it is freed, and the next one faults its pages in again: 30 page faults,
    about 100 us, for each. It keeps up to 32 MB of freed memory for reuse here instead,
    and maps blocks from 8 MB on. (Other C libraries: nothing to set.)"""
    gc.set_threshold(200_000, 10, 10)
    gc.freeze()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 8 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 32 * 1024 * 1024)
    except (OSError, AttributeError):
        pass


# mallopt's parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def check(args: argparse.Namespace) -> int:
    from proxy.plugins import PluginHost

    try:
        config = load_config(args.config)
        host = PluginHost()
        host.discover()
        host.enable(config)
    except ConfigError as exc:
        return _fail(str(exc))
    usable, skipped = available_providers(config)
    print(f"{config.source}: OK")
    print("providers:")
    for name, provider in config.providers.items():
        state = f"skipped ({skipped[name]})" if name in skipped else "ready"
        where = provider.base_url or "local"
        print(f"  {name:<14} {provider.type:<10} {where:<36} {state}")
    print("models:")
    for model in config.models:
        targets = ", ".join(f"{t.provider}/{t.model}" + ("" if t.provider in usable
                                                          else " (provider skipped)")
                            for t in model.targets)
        strategy = f"{model.strategy}: " if len(model.targets) > 1 else ""
        print(f"  {model.name:<24} -> {strategy}{targets}")
    print(f"plugins enabled: {', '.join(sorted(host.enabled)) or 'none'}")
    print(f"classifiers enabled: {', '.join(sorted(host.enabled_classifiers)) or 'none'}")
    return 0


def plugins(args: argparse.Namespace) -> int:
    from proxy.plugins import PluginHost

    config: Config | None = None
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"hookproxy: warning: {exc}; showing what is installed", file=sys.stderr)
    host = PluginHost()
    host.discover()
    problem = None
    if config is not None:
        try:
            host.enable(config)
        except ConfigError as exc:
            problem = str(exc)
    if args.json:
        print(_plugins_json(host, config, problem))
        return 2 if problem else 0
    print(f"{'name':<16} {'kind':<11} {'package':<22} {'version':<9} {'enabled':<8} hooks")
    for info in sorted(host.installed.values(), key=lambda i: (i.kind, i.name)):
        enabled = "error" if info.error else ("yes" if info.enabled else "no")
        print(f"{info.name:<16} {info.kind:<11} {info.package:<22} {info.version:<9} "
              f"{enabled:<8} {', '.join(info.hooks)}")
        if info.error:
            print(f"{'':<16} error: {info.error}")
    if problem:
        return _fail(problem)
    return 0


def _plugins_json(host: PluginHost, config: Config | None, problem: str | None) -> str:
    """What ``plugins --json`` prints: one object per installed plugin and classifier,
    with what the config lets requests do with it."""
    import msgspec

    listed = []
    for info in sorted(host.installed.values(), key=lambda i: (i.kind, i.name)):
        entry = msgspec.to_builtins(info)
        entry["per_request"] = info.name in host.per_request
        entry["locked"] = info.name in host.locked
        entry["request_settings"] = sorted(host.adjustable.get(info.name, ()))
        entry["timeout"] = host.timeouts.get(info.name)
        listed.append(entry)
    return msgspec.json.encode({"config": config.source if config else None,
                                "config_error": problem, "plugins": listed}).decode()


def new_plugin(args: argparse.Namespace) -> int:
    from pathlib import Path

    from proxy.scaffold import new_plugin as write_package

    try:
        folder = write_package(args.name, Path(args.dir))
    except ValueError as exc:
        return _fail(str(exc))
    except FileExistsError:
        return _fail(f"{Path(args.dir) / f'hookproxy-{args.name}'}: already exists; "
                     "not overwriting it")
    except OSError as exc:
        return _fail(f"{args.dir}: cannot write: {exc.strerror}")
    print(f"wrote {folder}: `cd {folder} && pip install -e '.[test]' && pytest` runs its "
          f"test; [plugins.{args.name}] in config.toml switches it on")
    return 0


def init(args: argparse.Namespace) -> int:
    """Writes the annotated starter config; never over an existing file."""
    from pathlib import Path

    path = Path(args.path)
    if path.is_dir():
        path = path / "config.toml"
    try:
        with path.open("x", encoding="utf-8") as out:
            out.write(packaged_text("starter.toml"))
    except FileExistsError:
        return _fail(f"{path}: already exists; not overwriting it")
    except OSError as exc:
        return _fail(f"{path}: cannot write: {exc.strerror}")
    print(f"wrote {path}: `hookproxy check --config {path}` shows what it serves, "
          f"`hookproxy serve --config {path}` runs it")
    return 0


def reload_running(args: argparse.Namespace) -> int:
    """POSTs /admin/reload, with the admin key from [auth].admin_key_env if there is one."""
    import os
    import urllib.error
    import urllib.request

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(f"not reloading, the config is not valid: {exc}")
    url = args.url or f"http://{config.server.host}:{config.server.port}"
    headers = {}
    admin = os.environ.get(config.auth.admin_key_env, "") if config.auth.admin_key_env else ""
    if admin:
        headers["authorization"] = f"Bearer {admin}"
    request = urllib.request.Request(f"{url}/admin/reload", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(response.read().decode())
    except urllib.error.HTTPError as exc:
        return _fail(f"{url}: {exc.code}: {exc.read().decode()}")
    except OSError as exc:
        return _fail(f"{url}: cannot reach the proxy: {exc}")
    return 0


def tail_log(args: argparse.Namespace) -> int:
    from pathlib import Path

    from proxy.tail import Filters, log_files, tail

    if args.file:
        path = Path(args.file)
    else:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            return _fail(str(exc))
        if not config.log.path:
            return _fail(f"{config.source}: [log].path is empty: there is no log to follow")
        path = Path(config.log.path)
    if not log_files(path) and not args.follow:
        return _fail(f"{path}: no such log file")
    filters = Filters(model=args.model, provider=args.provider, tag=args.tag,
                      endpoint=args.endpoint,
                      status=args.status, grep=args.grep)
    colour = {"always": True, "never": False}.get(args.color)
    return tail(path, filters, last=args.lines, follow=args.follow, colour=colour)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hookproxy", description="An LLM gateway with "
                                     "pluggy plugins, for OpenAI and Anthropic clients.")
    parser.add_argument("--version", action="version", version=f"hookproxy {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the proxy")
    serve_cmd.add_argument("--host", help="address to bind (default: [server].host)")
    serve_cmd.add_argument("--port", type=int, help="port (default: [server].port)")
    serve_cmd.add_argument("--allow-unauthenticated", action="store_true",
                           help="listen beyond loopback even with no [auth] keys")
    serve_cmd.add_argument("--workers", type=_workers, default=None,
                           help="worker processes on the port, or 'auto' (one per core; "
                                "default: [server].workers)")
    serve_cmd.set_defaults(run=serve)
    check_cmd = commands.add_parser("check", help="validate a config and show what it serves")
    check_cmd.set_defaults(run=check)
    plugins_cmd = commands.add_parser("plugins", help="list installed plugins and classifiers")
    plugins_cmd.add_argument("--json", action="store_true",
                             help="print JSON (for scripts) instead of a table")
    plugins_cmd.set_defaults(run=plugins)
    new_cmd = commands.add_parser("new-plugin", help="write a plugin package to start from")
    new_cmd.add_argument("name", help="the plugin's name (its [plugins.NAME] in config.toml)")
    new_cmd.add_argument("--dir", default=".",
                         help="where to write hookproxy-NAME/ (default: here)")
    new_cmd.set_defaults(run=new_plugin)
    init_cmd = commands.add_parser("init", help="write the annotated starter config.toml")
    init_cmd.add_argument("path", nargs="?", default="config.toml",
                          help="file (or folder) to write (default: ./config.toml)")
    init_cmd.set_defaults(run=init)
    reload_cmd = commands.add_parser("reload", help="make a running proxy re-read its config")
    reload_cmd.add_argument("--url", help="the proxy (default: from [server] of the config)")
    reload_cmd.set_defaults(run=reload_running)
    tail_cmd = commands.add_parser("tail", help="follow the JSONL request log")
    tail_cmd.add_argument("--file", help="log file (default: [log].path of the config)")
    tail_cmd.add_argument("-n", "--lines", type=int, default=10,
                          help="show this many earlier requests first (default 10)")
    tail_cmd.add_argument("--no-follow", dest="follow", action="store_false",
                          help="print and exit instead of following")
    tail_cmd.add_argument("--model", default="", help="requested or answering model contains")
    tail_cmd.add_argument("--provider", default="", help="provider contains")
    tail_cmd.add_argument("--tag", default="", help="a tag contains")
    tail_cmd.add_argument("--endpoint", default="",
                          help="the endpoint contains (responses, embeddings, /v1/messages)")
    tail_cmd.add_argument("--status", default="", help="ok, error, 4xx, 5xx or a status code")
    tail_cmd.add_argument("--grep", default="", help="the record contains this text")
    tail_cmd.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    tail_cmd.set_defaults(run=tail_log)
    for command in (serve_cmd, check_cmd, plugins_cmd, tail_cmd, reload_cmd):
        command.add_argument("--config", default=None,
                             help="config file (default: ./config.toml if it exists, "
                                  "else the built-in default)")
    return parser


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of workers, or 'auto'")
    return int(value)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hookproxy")
    except PackageNotFoundError:
        from proxy import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
