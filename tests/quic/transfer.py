"""A QUIC transfer for tests/e2e_udp_gso.rs (aioquic): the client sends 8 MiB on one
stream, the server answers with the SHA-256 of what it received and 8 MiB of its own;
the client checks both digests.

    transfer.py server ADDRESS PORT DIR   # self-signed certificate written into DIR;
                                          # prints "listening", serves one transfer
    transfer.py client ADDRESS PORT DIR
"""

import asyncio
import datetime
import hashlib
import ipaddress
import os
import sys

from aioquic.asyncio import connect, serve
from aioquic.quic.configuration import QuicConfiguration

LEN = 8 << 20
ALPN = ["upx-test"]


def payload(seed: bytes) -> bytes:
    """LEN bytes of a SHA-256 counter stream, the same on both ends."""
    blocks = (hashlib.sha256(seed + i.to_bytes(4, "little")).digest() for i in range(LEN // 32))
    return b"".join(blocks)


def certificate(directory: str, address: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "upx-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


async def run_server(address: str, port: int, directory: str):
    configuration = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    configuration.load_cert_chain(*certificate(directory, address))
    done = asyncio.get_running_loop().create_future()

    def handler(reader, writer):
        async def transfer():
            received = hashlib.sha256()
            total = 0
            while True:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    break
                received.update(chunk)
                total += len(chunk)
            writer.write(total.to_bytes(8, "little") + received.digest())
            writer.write(payload(b"down"))
            writer.write_eof()
            await writer.drain()
            # The client closes the connection once it has everything.
            await asyncio.sleep(0)
            if not done.done():
                done.set_result(None)

        asyncio.ensure_future(transfer())

    server = await serve(address, port, configuration=configuration, stream_handler=handler)
    print("listening", flush=True)
    try:
        await asyncio.wait_for(done, 120)
        # Let the last packets (and retransmissions) go before closing.
        await asyncio.sleep(2)
    finally:
        server.close()


async def run_client(address: str, port: int):
    configuration = QuicConfiguration(is_client=True, alpn_protocols=ALPN)
    configuration.verify_mode = __import__("ssl").CERT_NONE
    up = payload(b"up")
    async with connect(address, port, configuration=configuration) as client:
        reader, writer = await client.create_stream()
        writer.write(up)
        writer.write_eof()
        answer = await reader.read()
    total = int.from_bytes(answer[:8], "little")
    if total != LEN or answer[8:40] != hashlib.sha256(up).digest():
        sys.exit(f"up: the server received {total} bytes, digest mismatch or short")
    down = answer[40:]
    if len(down) != LEN or down != payload(b"down"):
        sys.exit(f"down: {len(down)} bytes received, not the server's {LEN}")
    print(f"{LEN} bytes each way, digests match")


def main():
    role, address, port, directory = sys.argv[1:5]
    if role == "server":
        asyncio.run(run_server(address, int(port), directory))
    else:
        asyncio.run(run_client(address, int(port)))


if __name__ == "__main__":
    main()
