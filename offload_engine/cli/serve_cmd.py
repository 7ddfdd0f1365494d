"""``offload-engine serve MODEL``: an OpenAI-compatible HTTP server with request batching."""

from __future__ import annotations

import importlib.util
import signal

from ..errors import ConfigError
from ..units import parse_bytes
from .options import add_engine_args, add_model_args, engine_config_from_args, model_from_args


def register(commands) -> None:
    parser = commands.add_parser(
        "serve", help="serve a quantized model over an OpenAI-compatible HTTP API",
        description="Serve /v1/chat/completions, /v1/completions and /v1/models; concurrent "
                    "requests are decoded together, one forward per step for the whole batch.")
    add_model_args(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    add_server_args(parser)
    add_engine_args(parser)
    group = parser.add_argument_group("batching")
    group.add_argument("--max-batch", type=int, default=8, metavar="N",
                       help="sequences decoded together in one forward (default 8)")
    group.add_argument("--max-queue", type=int, default=64, metavar="N",
                       help="requests waiting for a batch slot before new ones get 429 "
                            "(default 64)")
    group.add_argument("--max-prefill-tokens", type=int, default=8192, metavar="N",
                       help="prompts admitted together are prefilled in one forward, "
                            "left-padded to the longest: at most N = rows x longest prompt "
                            "per forward; the rest wait for the next step, and a longer prompt "
                            "runs alone (default 8192)")
    parser.set_defaults(handler=run)


def add_server_args(parser) -> None:
    group = parser.add_argument_group("requests")
    group.add_argument("--api-key", default=None, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' on /v1/ routes (401 without "
                            "it); default: $OFFLOAD_ENGINE_API_KEY, else no key")
    group.add_argument("--max-body-size", type=parse_bytes, default="8MiB", metavar="B",
                       help="larger request bodies get 413 before they are parsed "
                            "(default 8MiB)")
    group.add_argument("--allowed-hosts", type=lambda v: tuple(v.split(",")), default=(),
                       metavar="NAMES",
                       help="without --api-key, requests must name this server by an IP "
                            "address, localhost or --host in their Host header (403 otherwise: "
                            "DNS rebinding); add comma-separated names here, or '*' for any")
    group.add_argument("--docs", action="store_true",
                       help="serve /docs, /redoc and /openapi.json (off by default: they are "
                            "open without the key and load scripts from a CDN)")
    group.add_argument("--default-max-tokens", type=int, default=1024, metavar="N",
                       help="tokens a chat request without max_tokens may generate at most "
                            "(default 1024; the context's end comes first if sooner)")
    group.add_argument("-c", "--ctx-size", "--max-model-len", dest="ctx_size", type=int,
                       default=None, metavar="N",
                       help="tokens a prompt plus its reply may take (llama.cpp's -c, vLLM's "
                            "--max-model-len); default: the model's context")
    group.add_argument("--served-model-name", default=None, metavar="NAME",
                       help="the model id clients see and send (default: the directory's "
                            "name); requests may also leave model out")


def require_server_extras() -> None:
    """Fail with one line naming the extra to install when FastAPI or uvicorn is missing."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"`serve` needs {' and '.join(missing)}: "
                          "pip install 'offload-engine[serve]'")


def run(args) -> int:
    require_server_extras()
    model = model_from_args(args)
    from ..server.config import ServerConfig
    from ..server.listen import bind_socket

    config = ServerConfig(host=args.host, port=args.port, max_batch=args.max_batch,
                          max_queue=args.max_queue,
                          max_prefill_tokens=args.max_prefill_tokens,
                          api_key=ServerConfig.key_from_env(args.api_key),
                          max_body_bytes=args.max_body_size,
                          default_max_tokens=args.default_max_tokens,
                          ctx_size=args.ctx_size, served_model_name=args.served_model_name,
                          allowed_hosts=args.allowed_hosts, docs=args.docs)
    # bound before torch and the server's libraries are imported (seconds): a client that
    # connects meanwhile waits in the listen queue, then gets /health's "loading"
    sock = bind_socket(config.host, config.port)
    from ..server.runner import serve

    served = []

    def announce(model_id: str, url: str) -> None:
        served.append(model_id)
        key = "; API key required" if config.api_key else ""
        print(f"serving model {model_id!r} at {url} (max batch {config.max_batch}, "
              f"max queue {config.max_queue}{key}); Ctrl-C stops", flush=True)

    def listening(url: str) -> None:
        print(f"listening on {url}; loading {model} (GET {url}/health answers 503 "
              "\"loading\" until the model is ready)", flush=True)

    try:
        serve(model, engine_config_from_args(args), config, on_loaded=announce,
              on_listening=listening, sock=sock)
    finally:
        if served:
            _ignore_ctrl_c()
    return 0


def _ignore_ctrl_c() -> None:
    """Called once the server has stopped and the engine is closed.

    What is left is the interpreter's cleanup (seconds with torch loaded), during which
    Python resets Ctrl-C to the OS default. Ignored instead, a second Ctrl-C can neither
    kill that cleanup nor interrupt it with a traceback.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
