"""moto's S3 server on loopback for the object-storage tests (tests/test_s3.py, tests/test_ray.py)."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, Iterator


@contextlib.contextmanager
def moto_s3() -> Iterator[Dict[str, str]]:
    """Start moto's S3 server on 127.0.0.1 (a free port), put its endpoint and test credentials in the environment
    (the standard AWS variables, which child processes inherit), yield them; stop it and restore the environment."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    forget_s3_clients()
    try:
        yield env
    finally:
        server.stop()
        forget_s3_clients()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def forget_s3_clients() -> None:
    """Drop fsspec's cached S3 filesystems: one made while another server ran keeps that server's endpoint (the
    environment is read when a client is made, and the cache key does not hold it), so a later test in the same
    process would talk to a stopped server."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()
