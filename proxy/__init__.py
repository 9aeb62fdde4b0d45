"""message-proxy: RabbitMQ to Redis Streams and AMQP exchanges, through route rules."""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Lazy: ``python -m proxy.probe`` (the HEALTHCHECK, every 10 s) should not pay for
    # importlib.metadata, which is most of its start-up.
    if name != "__version__":
        raise AttributeError(f"module 'proxy' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("message-proxy")
    except PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0"
