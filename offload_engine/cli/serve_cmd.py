"""``offload-engine serve MODEL``: an OpenAI-compatible HTTP server with request batching."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ConfigError
from .options import add_engine_args, engine_config_from_args


def register(commands) -> None:
    parser = commands.add_parser(
        "serve", help="serve a quantized model over an OpenAI-compatible HTTP API",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models; concurrent "
                    "requests are decoded together, one forward per step for the whole batch.")
    parser.add_argument("model", type=Path, help="a directory written by `quantize`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    add_engine_args(parser)
    group = parser.add_argument_group("batching")
    group.add_argument("--max-batch", type=int, default=8, metavar="N",
                       help="sequences decoded together in one forward (default 8)")
    group.add_argument("--max-queue", type=int, default=64, metavar="N",
                       help="requests waiting for a batch slot before new ones get 429 "
                            "(default 64)")
    parser.set_defaults(handler=run)


def require_server_extras() -> None:
    """Fail with one line naming the extra to install when FastAPI or uvicorn is missing."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"`serve` needs {' and '.join(missing)}: "
                          "pip install 'offload-engine[serve]'")


def run(args) -> int:
    require_server_extras()
    from ..server.app import ServerConfig, serve

    config = ServerConfig(host=args.host, port=args.port, max_batch=args.max_batch,
                          max_queue=args.max_queue)

    def announce(model_id: str) -> None:
        print(f"serving model {model_id!r} at http://{config.host}:{config.port}/v1 "
              f"(max batch {config.max_batch}, max queue {config.max_queue}); Ctrl-C stops",
              flush=True)

    serve(args.model, engine_config_from_args(args), config, on_loaded=announce)
    return 0
