"""A CA, a server certificate and a client certificate, made with openssl for one session.

The server certificate names only ``DNS:localhost`` (no IP address), so a client that connects to
127.0.0.1 verifies the host name only when it is told the server name: that is what makes a
``server_name`` option testable.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.servers.base import ServerStartError, need_binary


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of these: a client trusting only it must refuse

    @classmethod
    def make(cls, folder: Path) -> Certificates:
        openssl = need_binary("openssl")

        def run(*args: str) -> None:
            done = subprocess.run([openssl, *args], capture_output=True, text=True, check=False)
            if done.returncode:
                raise ServerStartError(f"openssl {args[0]}: {done.stderr.strip()[-300:]}")

        def ca(name: str) -> tuple[Path, Path]:
            cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
            run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", f"/CN=message-proxy test {name}",
                "-keyout", str(key), "-out", str(cert))  # fmt: skip
            return cert, key

        def signed(name: str, ca_cert: Path, ca_key: Path, extensions: str) -> tuple[Path, Path]:
            cert, key, request = (folder / f"{name}.pem", folder / f"{name}-key.pem",
                                  folder / f"{name}.csr")  # fmt: skip
            ext = folder / f"{name}.ext"
            ext.write_text(extensions)
            run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(key), "-out", str(request))  # fmt: skip
            run("x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key),
                "-CAcreateserial", "-days", "2", "-extfile", str(ext),
                "-out", str(cert))  # fmt: skip
            key.chmod(0o644)  # RabbitMQ runs as this user, but keep it readable for any server
            return cert, key

        folder.mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key = ca("ca")
        other_ca, _ = ca("other-ca")
        server_cert, server_key = signed(
            "localhost", ca_cert, ca_key,
            "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )  # fmt: skip
        client_cert, client_key = signed(
            "message-proxy-client", ca_cert, ca_key, "extendedKeyUsage=clientAuth\n"
        )
        return cls(ca_cert, server_cert, server_key, client_cert, client_key, other_ca)
