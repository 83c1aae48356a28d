"""put / delete / dump / status against etcd, run inside a test host's namespace (ip netns exec), so that every
socket the gRPC client opens lives in that namespace.

    python etcd_tool.py ENDPOINT put KEY VALUE | put-file KEY PATH | delete KEY | dump PREFIX | status
"""

from __future__ import annotations

import asyncio
import json
import sys

import aetcd


async def main(endpoint: str, verb: str, *args: str) -> None:
    host, port = endpoint.rsplit(":", 1)
    client = aetcd.Client(host, int(port), timeout=5)
    try:
        if verb == "put":
            await client.put(args[0].encode(), args[1].encode())
        elif verb == "put-file":  # values larger than one command-line argument may be
            with open(args[1], "rb") as f:
                await client.put(args[0].encode(), f.read())
        elif verb == "delete":
            await client.delete(args[0].encode())
        elif verb == "dump":
            result = await client.get_prefix(args[0].encode())
            print(json.dumps({bytes(kv.key).decode(errors="replace"): bytes(kv.value).decode(errors="replace")
                              for kv in result}))
        elif verb == "status":
            await client.status()
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
