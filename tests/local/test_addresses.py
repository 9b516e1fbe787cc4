"""Local pod and Service addresses skip those another local cluster already listens on."""

from __future__ import annotations

import ipaddress
import socket

from disaggserve.local.addresses import Addresses, random_block


def test_an_address_whose_port_is_taken_is_skipped():
    addresses = Addresses(random_block())
    first = str(next(ipaddress.ip_network(addresses.block).hosts()))
    with socket.socket() as taken:
        taken.bind((first, 0))
        taken.listen()
        port = taken.getsockname()[1]
        got = addresses.take([port])
    assert got != first and ipaddress.ip_address(got) in ipaddress.ip_network(addresses.block)
    assert addresses.take([port]) not in (first, got), "each address is handed out once"


def test_blocks_are_inside_loopback():
    for _ in range(50):
        block = ipaddress.ip_network(random_block())
        assert block.subnet_of(ipaddress.ip_network("127.0.0.0/8")) and block.prefixlen == 20
