"""Runs one untrusted program for :mod:`tide_ds.eval.sandbox` (executed as a script, never imported by tide_ds).

    python -I _sandbox_child.py PROGRAM MEMORY_BYTES CPU_SECONDS FILE_BYTES MARKER

This process forks a worker and waits for it: inside a new PID namespace this process is PID 1 (which
the kernel shields from signals it has no handler for, so the limits' signals must hit another process),
and when it exits the kernel kills everything left in the namespace. The worker sets its resource
limits, disables sockets, runs the program as ``__main__`` and, only if the program ran to its end,
writes the file MARKER (so ``os._exit(0)`` half-way is not a pass).

Exit status: 0 ran to the end; 1 an exception (a failed assert); 3 ``MemoryError``; 4 ``SystemExit``
before the end; 128 + n when the worker died of signal n (SIGXCPU: the CPU limit; SIGXFSZ: the output limit).
"""

import os
import resource
import sys
import traceback

EXIT_EXCEPTION, EXIT_MEMORY, EXIT_SYSTEM_EXIT = 1, 3, 4


def _disable_network() -> None:
    import socket

    def denied(*args, **kwargs):
        raise PermissionError("network access is disabled in the tide-ds sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            denied()

    socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
        setattr(socket, name, denied)


def _worker(program: str, memory: int, cpu: int, file_bytes: int, marker: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _disable_network()
    with open(program) as fh:
        source = fh.read()
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except MemoryError:
        os._exit(EXIT_MEMORY)  # nothing that allocates: the limit is reached
    except SystemExit:
        os._exit(EXIT_SYSTEM_EXIT)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(EXIT_EXCEPTION)
    with open(marker, "w") as fh:
        fh.write("done")
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    program, memory, cpu, file_bytes, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    pid = os.fork()
    if pid == 0:
        _worker(program, memory, cpu, file_bytes, marker)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
