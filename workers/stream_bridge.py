"""The stream bridge role: RabbitMQ queues to Redis Streams only."""

import sys

from proxy.cli import role_main


def main() -> int:
    return role_main("stream-bridge")


if __name__ == "__main__":
    sys.exit(main())
