"""`kcache serve`: the OpenAI-compatible server on uvicorn.

SIGTERM (or Ctrl-C) stops accepting connections, gives in-flight requests --shutdown-grace seconds to finish, fails
the rest with a 503 (an error event if streaming), then exits 0.
"""
from __future__ import annotations

import argparse
import os
import signal

from kcache.cli import CLIError, add_engine_args, engine_config_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("KCACHE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/ routes (default: $KCACHE_API_KEY; none: open)")
    s.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: --model)")
    s.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted (413 above)")
    s.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get to finish on SIGTERM")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_engine_args(p)


def run(args) -> int:
    try:
        import uvicorn

        from kcache.server.app import build_app
    except ImportError as e:  # the server's packages are an extra
        raise CLIError(f"kcache serve needs the serve extra ({e.name} is missing): pip install 'kcache[serve]'") from None
    from kcache.engine.async_engine import AsyncEngine
    from kcache.engine.llm_engine import LLMEngine

    if args.shutdown_grace < 0 or args.max_body_mb <= 0:
        raise CLIError("--shutdown-grace must be >= 0 and --max-body-mb > 0")
    core = LLMEngine(engine_config_from_args(args))
    if core.tokenizer is None:
        raise CLIError("this model has no tokenizer files; the server needs text in and out")
    engine = AsyncEngine(core)
    app = build_app(engine, args.served_model_name or args.model, args.api_key, int(args.max_body_mb * 2**20))
    # uvicorn's own wait for open connections is only a backstop: the engine fails what is left at the deadline
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_grace + 10)
    server = graceful_server(config, engine, args.shutdown_grace)
    # After a graceful stop uvicorn re-raises the signal to the handler that was there before it; for SIGTERM that
    # would kill the process (exit -15). A no-op handler makes a requested stop end with exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 0


def graceful_server(config, engine, grace_s: float):
    """A uvicorn.Server whose shutdown starts the engine's grace period the moment it stops accepting connections."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            engine.begin_shutdown(grace_s)
            await super().shutdown(sockets)

    return GracefulServer(config)
