"""The sandbox's child: isolate this process, then run one Python program in it.

Run as `python -I -B sandbox_child.py WORKDIR PROGRAM CPU_SECONDS MEMORY_BYTES` (by sandbox.py),
standalone: it imports nothing from tokenmill. In order, while the process is still
single-threaded:

1. resource limits: CPU seconds, address space, file size, open files, no core dumps;
2. namespaces where the kernel allows them: a new user + mount + network namespace, in which
   every mount is remounted read-only except WORKDIR (bind-mounted onto itself), and the network
   has only a downed loopback; otherwise a network namespace alone (root), otherwise nothing;
3. a Python-level guard, also where the namespaces worked: sockets, process creation and
   ctypes refused; open/os.open for writing and the os calls that change the filesystem refused
   outside WORKDIR;
4. chdir(WORKDIR) and exec the program as __main__.

How far step 2 got is written to WORKDIR/.isolation for the parent to report.
"""

import builtins
import ctypes
import io
import os
import resource
import socket
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
# Flags a remount inside a user namespace must keep (the kernel locks them).
LOCKED_FLAGS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
                "relatime": 1 << 21}  # fmt: skip
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def set_limits(cpu_seconds: int, memory_bytes: int) -> None:
    for limit, value in (
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_FSIZE, 16 << 20),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))


def isolate(workdir: str) -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET) == 0:
        if read_only_except(libc, workdir):
            return "namespaces"
        return "network-namespace"
    if libc.unshare(CLONE_NEWNET) == 0:
        return "network-namespace"
    return "python-guard"


def read_only_except(libc, workdir: str) -> bool:
    """Every mount read-only but a bind mount of `workdir`; False when `/` stayed writable."""
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    if libc.mount(workdir.encode(), workdir.encode(), None, MS_BIND | MS_REC, None) != 0:
        return False
    root_done = False
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        point = fields[4].encode().decode("unicode_escape")
        if point == workdir:
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for option in fields[5].split(","):
            flags |= LOCKED_FLAGS.get(option, 0)
        ok = libc.mount(None, point.encode(), None, flags, None) == 0
        root_done = root_done or (ok and point == "/")
    return root_done


def install_guard(workdir: str) -> None:
    real_open, real_os_open = builtins.open, os.open

    def check(path, dir_fd=None) -> None:
        if isinstance(path, int):
            path = os.readlink(f"/proc/self/fd/{path}")
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = os.path.realpath(path)
        if real != workdir and not real.startswith(workdir + os.sep):
            raise PermissionError(f"sandbox: no writes outside {workdir}: {path}")

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & WRITE_FLAGS:
            check(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    _guard_paths(check)
    _refuse_processes_and_sockets()


def _guard_paths(check) -> None:
    one_path = ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate",
                "utime", "mkfifo", "mknod", "makedirs", "removedirs", "chflags", "lchmod")  # fmt: skip
    two_paths = ("rename", "replace", "renames", "link", "symlink")
    for name in one_path + two_paths:
        real = getattr(os, name, None)
        if real is None:
            continue
        both = name in two_paths

        def guarded(*args, _real=real, _both=both, **kwargs):
            check(args[0], None if _both else kwargs.get("dir_fd"))
            if _both:
                check(args[1], kwargs.get("dst_dir_fd"))
            return _real(*args, **kwargs)

        setattr(os, name, guarded)


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is disabled")

    return refused


def _refuse_processes_and_sockets() -> None:
    import _socket
    import subprocess

    class NoSocket:
        def __init__(self, *args, **kwargs):
            raise PermissionError("sandbox: network access is disabled")

    socket.socket = _socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, _refuse("network access"))
    for name in dir(os):
        if name in ("system", "popen", "fork", "forkpty", "kill", "killpg") or name.startswith(
            ("exec", "spawn", "posix_spawn")
        ):
            setattr(os, name, _refuse(f"os.{name}"))
    subprocess.Popen = _refuse("subprocess")
    for name in ("ctypes", "_ctypes", "multiprocessing", "resource"):
        sys.modules[name] = None


def main() -> None:
    workdir, program_path = os.path.realpath(sys.argv[1]), sys.argv[2]
    set_limits(int(sys.argv[3]), int(sys.argv[4]))
    with open(program_path, encoding="utf-8") as f:
        source = f.read()
    isolation = isolate(workdir)
    with open(os.path.join(workdir, ".isolation"), "w") as f:
        f.write(isolation)
    install_guard(workdir)
    os.chdir(workdir)
    sys.argv = [program_path]
    sys.path.insert(0, workdir)
    code = compile(source, program_path, "exec")
    exec(code, {"__name__": "__main__", "__builtins__": builtins})


if __name__ == "__main__":
    main()
