"""The exchange relay role: RabbitMQ queues to other AMQP exchanges only (no redis installed)."""

import sys

from proxy.cli import role_main


def main() -> int:
    return role_main("exchange-relay")


if __name__ == "__main__":
    sys.exit(main())
