"""offload-engine: run large language models on small GPUs by streaming INT4 weights.

    import offload_engine
    with offload_engine.load("qwen32b-int4", gpu_budget="10GiB") as engine:
        print(engine.generate("Hello", max_new_tokens=32).text)
"""

from .version import __version__

__all__ = ["EngineConfig", "Engine", "load", "__version__"]


def __getattr__(name):
    # Lazy so that `offload-engine --help` and `import offload_engine` stay fast.
    if name in ("load", "Engine"):
        from .decode import api

        return getattr(api, name)
    if name == "EngineConfig":
        from .runtime.config import EngineConfig

        return EngineConfig
    raise AttributeError(f"module 'offload_engine' has no attribute {name!r}")
