#!/usr/bin/env python3
"""Objects for the backup benchmark, and its baseline, with nats-py (the upstream client).

usage:
  bench-objects.py fill     [connection] --bucket B [--sizes MB,MB,...] [--count N --total-mb T]
  bench-objects.py download [connection] --bucket B --out DIR

connection: --server URL (default nats://127.0.0.1:4222), --user U --password P, --ca FILE (TLS,
verified against that CA).

fill: create bucket B (when absent) and put objects `bench/NNNN.bin` of the given sizes in MB
(1e6 bytes), or N objects sharing T MB (default: 20 objects, 1000 MB, sizes from 1 MB up so that
large and small objects both appear). The bytes are 16 MiB of os.urandom repeated, each object
starting with its own 32 random bytes and an offset into the block, so every digest differs and
nothing compresses; generating them costs nothing next to the upload. nats-py's own put (128 KiB
chunks, as the platform's server writes).

download: the baseline a backup is measured against: every live object of B, one after the
other, streamed by nats-py's `get` (which checks the digest) into DIR/<index>.

Both print one JSON line: {"objects", "bytes", "seconds", "mb_per_s"}.
"""
import argparse, asyncio, io, json, os, ssl, sys, time

import nats
from nats.js.api import ObjectMeta

MB = 1_000_000
BLOCK = 16 << 20


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["fill", "download"])
    p.add_argument("--server", default="nats://127.0.0.1:4222")
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--ca", help="CA file to verify the server's TLS certificate against")
    p.add_argument("--bucket", required=True)
    p.add_argument("--sizes", help="comma-separated object sizes in MB")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--total-mb", type=int, default=1000)
    p.add_argument("--out", help="download: the directory the objects are written to")
    a = p.parse_args()
    if a.action == "download" and not a.out:
        p.error("download needs --out DIR")
    return a


async def connect(a):
    kw = {"servers": [a.server], "connect_timeout": 10, "allow_reconnect": False}
    if a.user is not None:
        kw["user"], kw["password"] = a.user, a.password or ""
    if a.ca:
        kw["tls"] = ssl.create_default_context(cafile=a.ca)
    return await nats.connect(**kw)


def sizes(a):
    if a.sizes:
        return [int(float(s) * MB) for s in a.sizes.split(",") if s.strip()]
    # Sizes rising linearly (1, 2, 3, ... parts) so the set holds small and large objects.
    parts = a.count * (a.count + 1) // 2
    out = [a.total_mb * MB * (i + 1) // parts for i in range(a.count)]
    out[-1] += a.total_mb * MB - sum(out)
    return out


class Noise(io.RawIOBase):
    """`size` bytes: a 32-byte random prefix, then the shared random block from `offset` on,
    repeated. Read by nats-py in its chunk size; never held whole."""

    def __init__(self, block, size, offset):
        self.block, self.left, self.pos = block, size, offset % len(block)
        self.prefix = os.urandom(min(32, size))

    def readable(self):
        return True

    def readinto(self, buf):
        n = 0
        view = memoryview(buf)
        while n < len(view) and self.left > 0:
            if self.prefix:
                piece = self.prefix[: len(view) - n]
                self.prefix = self.prefix[len(piece):]
            else:
                end = min(len(self.block), self.pos + len(view) - n)
                piece = self.block[self.pos:end]
                self.pos = end % len(self.block)
            piece = piece[: self.left]
            view[n:n + len(piece)] = piece
            n += len(piece)
            self.left -= len(piece)
        return n


async def fill(a, nc):
    js = nc.jetstream()
    try:
        store = await js.object_store(a.bucket)
    except Exception:
        store = await js.create_object_store(a.bucket)
    block = os.urandom(BLOCK)
    total, t0, wanted = 0, time.monotonic(), sizes(a)
    for i, size in enumerate(wanted):
        name = f"bench/{i:04d}.bin"
        data = io.BufferedReader(Noise(block, size, i * 7919 * 4096), buffer_size=1 << 20)
        info = await store.put(name, data, meta=ObjectMeta(name=name, description=f"bench object {i}"))
        total += info.size
    return len(wanted), total, time.monotonic() - t0


async def download(a, nc):
    store = await nc.jetstream().object_store(a.bucket)
    os.makedirs(a.out, exist_ok=True)
    t0, total, count = time.monotonic(), 0, 0
    try:
        infos = await store.list(ignore_deletes=True)
    except nats.js.errors.NotFoundError:
        infos = []  # nats-py's list of an empty bucket
    for info in infos:
        if info.deleted:
            continue
        path = os.path.join(a.out, str(count))
        with open(path, "wb") as f:
            # Streamed into the file (writeinto): without it nats-py appends every chunk to one
            # bytes object, which is quadratic and no fair baseline.
            await store.get(info.name, writeinto=f)
        total += os.path.getsize(path)
        count += 1
    return count, total, time.monotonic() - t0


async def main():
    a = parse()
    nc = await connect(a)
    try:
        count, total, secs = await (fill(a, nc) if a.action == "fill" else download(a, nc))
    finally:
        await nc.close()
    print(json.dumps({
        "objects": count,
        "bytes": total,
        "seconds": round(secs, 3),
        "mb_per_s": round(total / MB / secs, 1) if secs > 0 else None,
    }))


if __name__ == "__main__":
    asyncio.run(main())
