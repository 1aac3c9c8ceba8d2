"""Refuse the network in this Python process, as on a machine without internet.

Put this folder first on ``PYTHONPATH`` and Python imports it at start-up. Connections to this machine
(Unix sockets, loopback addresses: torch.distributed's rendezvous, pytest-xdist) still work; any other
connect or DNS lookup raises ``OSError`` with "network use in an offline run" in its message.
"""

import ipaddress
import socket

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}


def _is_local(host) -> bool:
    if not isinstance(host, str):
        return True  # a Unix socket path (bytes) or an address family without hosts
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host == socket.gethostname()
    return address.is_loopback or address.is_unspecified


def _guard(connect):
    def guarded(self, address, *args, **kwargs):
        if self.family != getattr(socket, "AF_UNIX", None) and isinstance(address, tuple) and not _is_local(address[0]):
            raise OSError(f"network use in an offline run: connect to {address!r}")
        return connect(self, address, *args, **kwargs)

    return guarded


_getaddrinfo = socket.getaddrinfo


def _local_getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and not _is_local(name):
        raise OSError(f"network use in an offline run: getaddrinfo({host!r})")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guard(socket.socket.connect)
socket.socket.connect_ex = _guard(socket.socket.connect_ex)
socket.getaddrinfo = _local_getaddrinfo
