"""A process that imports gradtrace once and forks a child per ``gradtrace`` command of the
docs tests: each command then skips the ~5 s of imports (Lightning, torchmetrics, ...) that a
fresh process pays, which is most of a shrunk run's time.

The child runs as a fresh process would: the command's working directory, environment,
arguments and standard streams (passed over the socket, SCM_RIGHTS), its exit status sent
back to the client (:data:`CLIENT`, the docs sandbox's ``gradtrace``). After the imports the
server has one thread, so forking it is safe; it serves one docs-test worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CLIENT", "SERVER_VARIABLE", "fork_server"]

SERVER_VARIABLE = "DOCS_TEST_FORK_SERVER"
"""The environment variable naming the server's socket."""
STARTUP_TIMEOUT_S = 120  # imports on a loaded 2-core machine

CLIENT = """\
import json, os, socket, sys

client = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
client.connect(os.environ[{variable!r}])
request = {{"args": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}
request["cifar_md5"] = {md5!r}
socket.send_fds(client, [json.dumps(request).encode()], [0, 1, 2])
status = client.recv(16)
sys.exit(int(status) if status else 1)  # no status: the child died of a signal
"""
"""The client side, for a script whose ``sys.argv`` is the command (``str.format`` it with
``variable`` = :data:`SERVER_VARIABLE` and ``md5``, the sandbox CIFAR archive's checksum)."""


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _run_child(connection: socket.socket, request: dict, fds: list[int]) -> int:
    from gradtrace.cli.main import main
    from helpers.docs_sandbox import shrunk_arguments

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["gradtrace", *request["args"]]
    try:
        main(shrunk_arguments(request["args"], request["cifar_md5"]))
        status = 0
    except SystemExit as stop:
        status = _exit_status(stop.code)
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    connection.send(str(status).encode())
    return status


def serve(path: str) -> None:
    """Accept commands on the socket ``path`` forever, one forked child each."""
    import gradtrace.cli.main  # noqa: F401  (the imports every child shares)
    import helpers.docs_sandbox  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path + ".part")
    listener.listen(16)
    os.replace(path + ".part", path)  # the socket appears once it accepts
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reap themselves
    while True:
        connection, _ = listener.accept()
        message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
        if os.fork():
            connection.close()
            for fd in fds:
                os.close(fd)
            continue
        listener.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the command waits for its own
        os._exit(_run_child(connection, json.loads(message), fds))


@contextmanager
def fork_server(folder: Path, env: Mapping[str, str]) -> Iterator[Path]:
    """A running server with its socket in ``folder`` and ``env`` as its environment (what
    torch reads at import, such as ``OMP_NUM_THREADS``, should match the commands')."""
    path = folder / "gradtrace.sock"
    tests = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {tests!r}); "
        f"from helpers.fork_server import serve; serve({str(path)!r})"
    )
    log = open(folder / "fork-server.log", "w")  # noqa: SIM115  (open while it runs)
    server = subprocess.Popen([sys.executable, "-c", code], env=dict(env), stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not path.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fork server did not start; see {folder}/fork-server.log")
            time.sleep(0.1)
        yield path
    finally:
        server.kill()
        server.wait()
        log.close()
