#!/usr/bin/env python3
"""Seeds for the `proxy` fuzz target: a few whole scenarios spelled in the byte encoding
`arbitrary::Unstructured` decodes (one byte per small choice, ranges big-endian, u16
little-endian), so the fuzzer starts from flows that connect, move data both ways, and
datagrams that are answered. Usage: seeds/proxy.py corpus/proxy"""
import sys
from pathlib import Path

OFFLOADS = {"none": 0, "header": 1, "checksum": 2, "tso": 3, "uso": 4}
MTUS = {1500: 0, 9000: 1, 65535: 2}
BUFFERS = {16384: 0, 65536: 1, 262144: 2}


def setup(v6, mtu, offload, tx_buffers, floor, buffer, max_flows):
    return bytes([int(v6), MTUS[mtu], OFFLOADS[offload], tx_buffers - 2, int(floor),
                  BUFFERS[buffer], max_flows - 1])


def turn(ms=1, faults=0, serve=0xFFFF):
    return bytes([0, faults, 0, ms]) + serve.to_bytes(2, "little")


def client_send(n):
    return bytes([4]) + n.to_bytes(2, "little")


def server_plans(n):
    return bytes([8]) + (n // 4).to_bytes(2, "little")


def connect(result=0):
    """0: success, 2: refused, 3: host unreachable."""
    return bytes([10, result])


def udp(port_choice, length, uso_size=None):
    out = bytes([13, port_choice]) + length.to_bytes(2, "big") + bytes([5])
    if uso_size is not None:
        out += bytes([1]) + (uso_size - 1).to_bytes(2, "big")
    return out


def echo(ident, length):
    return bytes([14, ident - 1, length])


def server_datagram(length, more=1):
    # One armed flow: the choice of flow takes no byte.
    return bytes([15, more]) + length.to_bytes(2, "big")


def server_error(errno_choice):
    return bytes([16, errno_choice, 1])


def main(out):
    out.mkdir(parents=True, exist_ok=True)
    established = turn() + connect() + turn() * 3
    seeds = {
        "bulk-v4-floor": setup(False, 1500, "none", 16, True, 65536, 2) + established
        + client_send(30000) + server_plans(40000) + turn() * 20,
        "jumbo-v6-tso-floor": setup(True, 9000, "tso", 8, True, 262144, 2) + established
        + client_send(60000) + server_plans(120000) + turn() * 10,
        "lossy-v4-64k": setup(False, 65535, "checksum", 4, False, 16384, 2) + established
        + client_send(20000) + server_plans(20000) + turn(faults=0x09) + turn(faults=0x12)
        + turn(faults=0x24) + turn() * 5,
        "uso-v4": setup(False, 1500, "uso", 16, True, 65536, 2) + udp(1, 3000, 1200)
        + server_datagram(500) + server_datagram(0, more=0) + server_error(0)
        + turn() + udp(0, 0) + server_datagram(100),
        "echo-v6": setup(True, 1500, "header", 16, False, 65536, 1) + echo(1, 56)
        + server_datagram(56) + echo(2, 8) + server_datagram(8) + turn(ms=200),
        "refused-v4": setup(False, 1500, "none", 4, True, 65536, 2) + turn() + connect(2)
        + turn() * 3,
        "unreachable-v6": setup(True, 1500, "tso", 4, True, 65536, 2) + turn() + connect(3)
        + turn() * 3,
    }
    for name, data in seeds.items():
        (out / name).write_bytes(data)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
