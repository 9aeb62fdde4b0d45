"""message-proxy: RabbitMQ to Redis Streams and AMQP exchanges, through route rules."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("message-proxy")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
