"""Loopback addresses for local pods and Services, free of other local clusters' sockets.

Every local pod and Service gets its own 127.x.y.z (ports stay as the manifests say, as on a
cluster). Several local clusters may run on one machine (parallel tests, a stale `up`), so
each allocator starts in a random block of 127/8 and skips an address where any port it needs
is already bound, instead of starting a process that would crash on "address in use".
"""

from __future__ import annotations

import ipaddress
import random
import socket
from collections.abc import Iterable, Iterator

BLOCK = 20  # a /20: 4094 addresses per allocator, 2480 blocks between 127.16.0.0 and 127.254.255.255


def random_block(first_octet: int = 16, last_octet: int = 254) -> str:
    """A random /20 inside 127.first_octet.0.0 .. 127.last_octet.255.255."""
    second = random.randint(first_octet, last_octet)
    third = random.randrange(0, 256, 256 >> (BLOCK - 16))
    return f"127.{second}.{third}.0/{BLOCK}"


def ports_free(ip: str, ports: Iterable[int]) -> bool:
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((ip, port))
            except OSError:
                return False
    return True


class Addresses:
    """Hands out addresses of one block, each once, skipping those whose ports are taken."""

    def __init__(self, block: str | None = None):
        self.block = block or random_block()
        self._hosts: Iterator[ipaddress.IPv4Address] = ipaddress.ip_network(self.block).hosts()

    def take(self, ports: Iterable[int] = ()) -> str:
        wanted = list(ports)
        for host in self._hosts:
            ip = str(host)
            if ports_free(ip, wanted):
                return ip
        raise RuntimeError(f"no free loopback address left in {self.block}")
