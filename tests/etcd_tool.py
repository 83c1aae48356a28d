"""put / delete / dump / status against etcd, run inside a test host's namespace (ip netns exec), so that every
socket the gRPC client opens lives in that namespace.

    python etcd_tool.py ENDPOINT [--cacert F --cert F --key F] [--user NAME:PASSWORD]
        put KEY VALUE | put-file KEY PATH | delete KEY | dump PREFIX | status | race
        | enable-auth ROOT_PASSWORD USER PASSWORD PREFIX

The connection is flanneld's own (daemon.registry.etcd), so TLS and authentication work here as they do there.
`enable-auth` is etcdctl's `user add root`, `role add`, `role grant-permission --prefix`, `user add`,
`user grant-role` and `auth enable`: USER may read and write PREFIX only.

`race` drives flanneld's EtcdRegistry: listings run while the connection under them is closed again and again
(as when the watch fails during a renewal), until some were cut off in flight, and it prints how each call
ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aetcd import rpc

from pyflannel.daemon.registry import Unavailable
from pyflannel.daemon.registry.etcd import EtcdRegistry, Security, _Client, _prefix_end, endpoints


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

    # The connection is dropped at a delay that sweeps 0-5 ms over the rounds, until some calls were cut off in
    # flight (at least 20 rounds): a fixed delay could let every call finish first on a fast machine.
    for round_ in range(400):
        if round_ >= 20 and outcomes.get("unavailable"):
            break
        calls = [asyncio.ensure_future(call()) for _ in range(10)]
        await asyncio.sleep(round_ % 11 * 0.0005)
        if registry._client is not None:
            await registry._drop(registry._client)
        await asyncio.gather(*calls)
    await registry.close()
    return outcomes


async def enable_auth(client: _Client, root_password: str, user: str, password: str, prefix: str) -> None:
    stub, md = rpc.AuthStub(client.channel), client.metadata
    await stub.UserAdd(rpc.AuthUserAddRequest(name="root", password=root_password), metadata=md)
    await stub.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"), metadata=md)
    await stub.RoleAdd(rpc.AuthRoleAddRequest(name="flannel"), metadata=md)
    perm = rpc.Permission(permType=rpc.Permission.READWRITE, key=prefix.encode(),
                          range_end=_prefix_end(prefix.encode()))
    await stub.RoleGrantPermission(rpc.AuthRoleGrantPermissionRequest(name="flannel", perm=perm), metadata=md)
    await stub.UserAdd(rpc.AuthUserAddRequest(name=user, password=password), metadata=md)
    await stub.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=user, role="flannel"), metadata=md)
    await stub.AuthEnable(rpc.AuthEnableRequest(), metadata=md)


async def main(args: argparse.Namespace) -> None:
    verb, rest = args.verb, args.args
    if verb == "race":
        print(json.dumps(await race(args.endpoint)))
        return
    user, _, password = args.user.partition(":")
    security = Security.build(cafile=args.cacert, certfile=args.cert, keyfile=args.key, username=user,
                              password=password)
    client = _Client(endpoints(args.endpoint, security.client_cert)[0], security)
    await client.connect()
    try:
        if verb == "put":
            await client.put(rest[0].encode(), rest[1].encode())
        elif verb == "put-file":  # values larger than one command-line argument may be
            with open(rest[1], "rb") as f:
                await client.put(rest[0].encode(), f.read())
        elif verb == "delete":
            await client.delete(rest[0].encode())
        elif verb == "dump":
            result = await client.get_prefix(rest[0].encode())
            print(json.dumps({bytes(kv.key).decode(errors="replace"): bytes(kv.value).decode(errors="replace")
                              for kv in result}))
        elif verb == "status":
            await client.status()
        elif verb == "enable-auth":
            await enable_auth(client, *rest)
    finally:
        await client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    for option in ("--cacert", "--cert", "--key", "--user"):
        parser.add_argument(option, default="")
    parser.add_argument("verb")
    parser.add_argument("args", nargs="*")
    asyncio.run(main(parser.parse_args()))
