"""The MPS control protocol, as both ends of it speak it: the plugin (:mod:`driver.plugin.mps`) and the
stand-in daemon of fake-GPU nodes (:mod:`driver.plugin.mps_standin`).

It is ``nvidia-cuda-mps-control``'s: one command per line (``get_server_list``, ``quit``,
``set_default_active_thread_percentage P``, ``set_default_device_pinned_mem_limit DEV LIMIT``, their
``get_`` forms), one reply line; a refused command's reply starts with ``Invalid`` or ``Unrecognized``.
The real daemon reads commands from its control pipe (through the ``nvidia-cuda-mps-control`` client);
the stand-in reads them from a unix socket named :data:`CONTROL_SOCKET` in the plugin's private per-GPU
directory.
"""

from __future__ import annotations

import socket
from pathlib import Path
from driver.errors import PartitaError

#: name of the stand-in's control socket in the plugin's private per-GPU directory
CONTROL_SOCKET = "control"

GET_SERVER_LIST = "get_server_list"
QUIT = "quit"
SET_ACTIVE_THREAD_PERCENTAGE = "set_default_active_thread_percentage"
GET_ACTIVE_THREAD_PERCENTAGE = "get_default_active_thread_percentage"
SET_PINNED_MEM_LIMIT = "set_default_device_pinned_mem_limit"
GET_PINNED_MEM_LIMIT = "get_default_device_pinned_mem_limit"

#: how a refused command's reply starts (the real daemon's words)
REFUSALS = ("Invalid", "Unrecognized")


class ProtocolError(PartitaError):
    """No daemon answers at the endpoint, or it refused the command; the message says which."""


def set_active_thread_percentage(percentage: int | float | str) -> str:
    return f"{SET_ACTIVE_THREAD_PERCENTAGE} {percentage}"


def set_pinned_mem_limit(limit: str, device: int = 0) -> str:
    return f"{SET_PINNED_MEM_LIMIT} {device} {limit}"


def is_refusal(reply: str) -> bool:
    return reply.startswith(REFUSALS)


def recv_line(conn: socket.socket) -> str:
    """One newline-terminated message (both directions), without its newline."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def send_line(conn: socket.socket, message: str) -> None:
    conn.sendall(message.encode() + b"\n")


def ask(control: Path, command: str, *, timeout: float = 5.0) -> str:
    """Send ``command`` to the stand-in listening at ``control``; its reply, or :class:`ProtocolError` when
    nothing answers there or the daemon refused the command."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(control))
        send_line(s, command)
        reply = recv_line(s)
    except OSError as e:
        raise ProtocolError(f"no MPS control daemon answers at {control}: {e}") from None
    finally:
        s.close()
    if is_refusal(reply):
        raise ProtocolError(f"MPS control daemon refused {command!r}: {reply}")
    return reply
