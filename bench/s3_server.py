"""moto's S3 backend behind waitress: the orchestration benchmark's S3 server
before it moved to rclone's (a Go S3 gateway), still measured for reference.

``python -m moto.server`` serves every AWS service moto emulates through
werkzeug's development server, which costs a PUT of 32 KB 3 to 5 ms on two
cores, nearly all of it the server's own: werkzeug closes the connection after
every response (a new TCP connection and a new thread per request), and moto's
dispatcher lists its ~150 service packages on disk for every request to find the
one that answers. Neither is S3 work, and neither is ours; a deployment's S3
(AWS, MinIO) keeps connections open. Here the same moto S3 application (same
request handling, same in-memory objects) is served alone, by waitress, a WSGI
server with HTTP/1.1 keep-alive.

    python bench/s3_server.py PORT
"""

from __future__ import annotations

import sys

from moto.moto_server.werkzeug_app import create_backend_app
from waitress import serve

# Worker threads: the benchmark's uploads, presigned downloads and the floor's
# requests, a few at a time.
THREADS = 4


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not argv[0].isdigit():
        raise SystemExit("usage: python bench/s3_server.py PORT")
    serve(create_backend_app("s3"), host="127.0.0.1", port=int(argv[0]), threads=THREADS)


if __name__ == "__main__":
    main(sys.argv[1:])
