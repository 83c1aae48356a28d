"""put / delete / dump / status against etcd, run inside a test host's namespace (ip netns exec), so that every
socket the gRPC client opens lives in that namespace.

    python etcd_tool.py ENDPOINT put KEY VALUE | put-file KEY PATH | delete KEY | dump PREFIX | status | race

`race` drives flanneld's EtcdRegistry: listings run while the connection under them is closed again and again
(as when the watch fails during a renewal), and it prints how each call ended.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aetcd

from daemon.registry import Unavailable
from daemon.registry.etcd import EtcdRegistry


async def race(endpoint: str) -> dict[str, int]:
    registry = EtcdRegistry(endpoint, "/coreos.com/network")
    outcomes: dict[str, int] = {}

    async def call() -> None:
        try:
            await registry.list_records()
            outcome = "ok"
        except Unavailable:
            outcome = "unavailable"
        except BaseException as exc:
            outcome = type(exc).__name__
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    for _ in range(20):
        calls = [asyncio.ensure_future(call()) for _ in range(10)]
        await asyncio.sleep(0.005)
        if registry._client is not None:
            await registry._drop(registry._client)
        await asyncio.gather(*calls)
    await registry.close()
    return outcomes


async def main(endpoint: str, verb: str, *args: str) -> None:
    if verb == "race":
        print(json.dumps(await race(endpoint)))
        return
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
