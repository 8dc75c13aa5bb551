"""Fetching a remote image URL for the API (`--allow-remote-images`) without serving as a proxy into
the server's own network.

A server that fetches whatever URL a client names can be pointed at its loopback services, the
cloud metadata address (169.254.169.254) or the office network. So, unless
`--allow-private-image-hosts`: the host name is resolved here, every address it resolves to must
be a public unicast one, and the connection goes to that checked address (a second DNS answer
cannot swap it: DNS rebinding); each redirect is checked the same way. Every failure to fetch,
whatever the cause, is the same message, so the errors cannot tell a client which ports are open.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable

from .openai_schema import ApiError

MAX_REDIRECTS = 5
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public_address(address: Address) -> bool:
    """Whether `address` is a public unicast one: not loopback, private, link-local, shared,
    multicast, reserved or unspecified (IPv4 inside IPv6 judged as IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def any_address(_: Address) -> bool:
    return True


def fetch_remote(url: str, where: str, max_bytes: int, timeout_s: float,
                 address_allowed: Callable[[Address], bool] = is_public_address) -> bytes:
    """GET `url` within `max_bytes` and a total deadline of `timeout_s` (httpx's timeout is per read:
    a server dripping a byte at a time would otherwise hold the request forever), following at
    most `MAX_REDIRECTS` redirects, connecting only to addresses `address_allowed` accepts."""
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target = httpx.URL(url)
            if target.scheme not in ("http", "https") or not target.host:
                raise ApiError(400, f"{where}: only http(s) image URLs can be fetched", param=where)
            address = _checked_address(target, where, address_allowed)
            try:
                data, redirect = _get(client, target, address, where, max_bytes, deadline, timeout_s)
            except httpx.HTTPError:
                raise _unreachable(where) from None
            if redirect is None:
                return data
            url = str(target.join(redirect))
    raise ApiError(400, f"{where}: more than {MAX_REDIRECTS} redirects", param=where)


def _checked_address(target, where: str, address_allowed: Callable[[Address], bool]) -> Address:
    """The address to connect to for `target`: every address its host resolves to must be allowed."""
    try:
        infos = socket.getaddrinfo(target.host, target.port or (443 if target.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise _unreachable(where) from None
    addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not addresses or not all(address_allowed(a) for a in addresses):
        raise ApiError(400, f"{where}: the image URL names a local or private network address, which this server "
                            "does not fetch (--allow-private-image-hosts allows it)", param=where)
    return addresses[0]


def _get(client, target, address: Address, where: str, max_bytes: int, deadline: float, timeout_s: float):
    """(body, None), or (b"", Location) for a redirect; the connection goes to `address`, with the
    URL's host name as Host header and TLS server name."""
    pinned = target.copy_with(host=str(address))
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    with client.stream("GET", pinned, headers={"Host": target.netloc.decode("ascii")},
                       extensions=extensions) as response:
        if response.is_redirect and "location" in response.headers:
            return b"", response.headers["location"]
        if response.status_code != 200:
            raise _unreachable(where)
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > max_bytes:
                raise ApiError(400, f"{where}: image over the {max_bytes // 2**20} MB limit", param=where)
            if time.monotonic() > deadline:
                raise ApiError(400, f"{where}: the image took over {timeout_s:g} s to arrive", param=where)
        return bytes(data), None


def _unreachable(where: str) -> ApiError:
    return ApiError(400, f"{where}: cannot fetch the image at that URL", param=where)
