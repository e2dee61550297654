"""Whether ``serve`` can listen on a host and port, checked before the model loads."""

from __future__ import annotations

import errno
import socket

# what to do about each bind error, by errno; others get the system's words alone
_FIXES = {
    errno.EADDRINUSE: "in use: stop what uses it or pass another --port",
    errno.EADDRNOTAVAIL: "not an address of this machine: give one of its addresses with --host (default 127.0.0.1)",
    errno.EACCES: "not allowed: ports below 1024 need privileges; pass --port 1024 or above",
}


def check_can_listen(host: str, port: int) -> None:
    """Bind, as the server will, every address ``host`` resolves to (all interfaces for "" or
    0.0.0.0) at ``port`` and let go; a ValueError in one line naming the problem and the fix
    otherwise. The server binds moments later: a port taken in between still fails there."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        raise ValueError(f"--host {host}: {e.strerror or e}; give an address or name of this machine (default 127.0.0.1)") from e
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a closed socket's wait does not block
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the IPv4 address is bound on its own
            try:
                s.bind(addr)
            except OSError as e:
                fix = _FIXES.get(e.errno or 0, "")
                raise ValueError(f"cannot listen on {addr[0]}:{port}: {e.strerror or e}" + (f"; {fix}" if fix else "")) from e
