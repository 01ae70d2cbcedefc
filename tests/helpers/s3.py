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
    try:
        yield env
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
