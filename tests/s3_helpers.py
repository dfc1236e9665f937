"""Shared by the tests that start an S3-compatible server (moto) on loopback."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_clients() -> None:
    # fsspec caches filesystem instances (and their endpoint): a changed environment needs new ones
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
