"""flannel-bench's request/response probe (src_ext/rr_probe.pyx) as a command, run inside a benchmark end:

    python -m pyflannel.bench.rr serve ADDR PORT                  answer requests until killed
    python -m pyflannel.bench.rr ping-pong ADDR PORT SECONDS BIND  print {"transactions": N, "seconds": S}

TCP_NODELAY on both ends: every byte is its own segment at once, as an RPC's request and answer are.
"""

from __future__ import annotations

import json
import socket
import sys

from pyflannel.bench._rr_probe import ping_pong, serve


def _socket(addr: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def main(argv: list[str]) -> int:
    match argv:
        case ["serve", addr, port]:
            with _socket(addr) as listener:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((addr, int(port)))
                listener.listen()
                serve(listener.fileno())
        case ["ping-pong", addr, port, seconds, bind]:
            with _socket(addr) as sock:
                sock.bind((bind, 0))
                sock.connect((addr, int(port)))
                done, elapsed = ping_pong(sock.fileno(), float(seconds))
            print(json.dumps({"transactions": done, "seconds": elapsed}))
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
