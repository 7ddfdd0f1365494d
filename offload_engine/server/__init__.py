"""An OpenAI-compatible HTTP server that decodes concurrent requests in one batch.

Needs the ``serve`` extra (FastAPI and uvicorn): ``pip install 'offload-engine[serve]'``.
Import ``offload_engine.server.app`` for ``create_app`` and ``serve``; this package itself
imports nothing, so the CLI's --help works without the extra. Stage 8: may use
quality/, decode/ and everything below them, never the CLI.
"""
