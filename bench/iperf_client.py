"""One iperf3 client run through the `iperf3` Python wrapper, printing iperf3's JSON result.

It runs as its own short-lived process (inside the client's namespace) because the wrapper cannot run twice in
one process: it points the process's stdout at a pipe with dup2 to capture libiperf's JSON and closes those
descriptors again when the Client is collected, after which a second Client fails with EBADF. The server side
is the iperf3 binary, since the wrapper's Server blocks its caller for the whole test with no way to stop it.

    python -m pyflannel.bench.iperf_client SERVER PORT {tcp,udp} STREAMS SECONDS BIND
"""

from __future__ import annotations

import json
import sys

import iperf3

UDP_PAYLOAD = 64


def main(argv: list[str]) -> int:
    server, port, proto, streams, seconds, bind = argv
    client = iperf3.Client()
    client.server_hostname = server
    client.port = int(port)
    client.protocol = proto
    client.num_streams = int(streams)
    client.duration = int(seconds)
    client.bind_address = bind
    if proto == "udp":
        client.blksize = UDP_PAYLOAD
        client.bandwidth = 0  # as fast as the sender can go: what counts is what arrives
    result = client.run()
    print(json.dumps({"error": result.error} if result.error else result.json))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
