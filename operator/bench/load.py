#!/usr/bin/env python3
"""Loads N keys spread over all hash slots into a local cachetier tier.

Keys are `bench:<i>` (no hash tags, so they cover every slot, unlike
redis-benchmark --cluster, which puts all of a node's keys into one slot).
Each key is routed to its slot's owner from CLUSTER SLOTS and written with
`redis-cli --pipe`, one pipe per primary.

    python3 operator/bench/load.py --port 7000 --keys 1000000 --value-size 32
"""
import argparse
import subprocess


def crc16(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def slot_owners(port: int) -> list:
    """Owner port of every slot, from CLUSTER NODES."""
    text = subprocess.run(["redis-cli", "-p", str(port), "cluster", "nodes"],
                          capture_output=True, text=True, check=True).stdout
    owners = [None] * 16384
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 9 or "master" not in fields[2]:
            continue
        node_port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for r in fields[8:]:
            if r.startswith("["):
                continue
            a, _, b = r.partition("-")
            for s in range(int(a), int(b or a) + 1):
                owners[s] = node_port
    return owners


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=7000)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--value-size", type=int, default=32)
    args = ap.parse_args()
    owners = slot_owners(args.port)
    value = b"x" * args.value_size
    per_node = {}
    for i in range(args.keys):
        key = b"bench:%d" % i
        port = owners[crc16(key) % 16384]
        buf = per_node.setdefault(port, bytearray())
        buf += b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value)
    for port, buf in per_node.items():
        subprocess.run(["redis-cli", "-p", str(port), "--pipe"], input=bytes(buf), check=True,
                       stdout=subprocess.DEVNULL)
    print(f"loaded {args.keys} keys into {len(per_node)} primaries")


if __name__ == "__main__":
    main()
