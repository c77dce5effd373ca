"""Process supervision for the stack: spawn a child in its own session with its log and pid
file, tell whether a pid is still that child, stop its process group, and probe ports and
health endpoints. Nothing here knows which components the stack has."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import httpx

from console.stack.components import HOST, StackError

_VENV_BIN = Path(sys.executable).parent
POLL_S = 0.1
PROBE_TIMEOUT_S = 0.5
_KILL_WAIT_S = 5.0
_LOG_TAIL_LINES = 5

# Popen objects of the processes this Python process started: polling them reaps an exited
# child, which would otherwise linger as a zombie that still looks alive to kill(pid, 0).
_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn(name: str, argv: list[str], env: dict[str, str], *, log: Path, pid_file: Path) -> int:
    """Start `argv` in a session of its own, output appended to `log`; returns its pid."""
    with private_log(log) as out:
        out.write(f"\n--- refundsaga stack: {name} starting at {datetime.now()}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own session: a Ctrl-C in the terminal that ran `up` does not reach it,
            # and `down` can signal the whole process group.
            start_new_session=True,
        )
    _children[proc.pid] = proc
    _write_pid(pid_file, proc.pid)
    return proc.pid


def exit_code(pid: int) -> int | None:
    """The exit code of a child this process started and saw exit; None otherwise."""
    proc = _children.get(pid)
    return None if proc is None else proc.returncode


def find_binary(name: str) -> str:
    """The `name` CLI beside this Python (the venv's), else on PATH."""
    beside = _VENV_BIN / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} CLI not found in {_VENV_BIN}: run `make install`")
    return found


def _write_pid(path: Path, pid: int) -> None:
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    proc = _children.get(pid)
    if proc is not None:
        # Kept after exit too: a failed start-up reports the exit code from it.
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: _is_ours() will say it is not ours
    # An exited process whose parent has not reaped it still answers kill(pid, 0).
    stat = _read_proc(pid, "stat")
    return stat is None or stat.rsplit(b")", 1)[-1].split()[:1] != [b"Z"]


def _read_proc(pid: int, entry: str) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/{entry}").read_bytes()
    except OSError:
        return None


def _is_ours(pid: int, markers: Sequence[str]) -> bool:
    """Whether `pid` is the process whose command line holds `markers`, not an unrelated one
    that reused the pid."""
    raw = _read_proc(pid, "cmdline")
    if raw is not None:
        argv = raw.decode(errors="replace").split("\0")
        return all(marker in argv for marker in markers)
    if Path("/proc/self").exists():
        return False  # gone, or another user's process we may not inspect
    try:  # no /proc (macOS): ask ps, whose output joins the arguments with spaces
        command = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: trust the pid file
    return all(marker in command for marker in markers)


def owned_pid(
    pid_file: Path, markers: Sequence[str], name: str, on_progress: Callable[[str], None]
) -> int | None:
    """The pid of the live process `pid_file` names, if its command line holds `markers`; a
    stale pid file is removed."""
    pid = live_pid(pid_file, markers)
    if pid is not None:
        return pid
    if pid_file.exists():
        on_progress(f"{name}: removing stale pid file {pid_file}")
        pid_file.unlink(missing_ok=True)
    return None


def live_pid(pid_file: Path, markers: Sequence[str]) -> int | None:
    """Like `owned_pid` but read-only, for `status()`."""
    pid = _read_pid(pid_file)
    if pid is not None and alive(pid) and _is_ours(pid, markers):
        return pid
    return None


def _signal_group(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        # Started with start_new_session, so it leads its own group; signal the group to
        # reach anything it spawned, but never a group we did not create.
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def _wait_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop(name: str, pid: int, timeout_s: float, on_progress: Callable[[str], None]) -> None:
    _signal_group(pid, signal.SIGTERM)
    if _wait_dead(pid, timeout_s):
        return
    on_progress(f"{name}: still running {timeout_s:g}s after SIGTERM, sending SIGKILL")
    _signal_group(pid, signal.SIGKILL)
    if not _wait_dead(pid, _KILL_WAIT_S):
        raise StackError(f"{name} (pid {pid}) survived SIGKILL; check `ps -p {pid}`")


def private_directory(path: Path) -> None:
    """A data directory only its owner can read: it holds the store, state and logs."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def private_log(path: Path) -> BinaryIO:
    """A log file opened for appending, owner only: logs may quote requests and errors."""
    fd = os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


@contextlib.contextmanager
def locked(data_dir: Path, deadline: float) -> Iterator[None]:
    """Serialize `up` and `down` on one data dir across processes."""
    private_directory(data_dir)
    with (data_dir / "stack.lock").open("a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StackError(
                        f"another `refund stack` command is running for {data_dir}; "
                        "wait for it to finish and try again"
                    ) from None
                time.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as log:
            log.seek(max(0, path.stat().st_size - 16_384))
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    tail = [line[:300] for line in text.splitlines() if line.strip()][-lines:]
    return "".join(f"\n    {line}" for line in tail)


def _port_in_use(port: int) -> bool:
    # Binding catches a socket that is bound but not listening; connecting catches a listener
    # that bind() would not conflict with (e.g. on another address on some systems).
    # SO_REUSEADDR as servers set it, so connections in TIME_WAIT do not count as "in use".
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return tcp_open(port, PROBE_TIMEOUT_S)


def tcp_open(port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def check_ports_free(ports: list[tuple[str, int, str]]) -> None:
    """Refuse when one of (component, port, env var that moves it) is taken."""
    for component, port, env_var in ports:
        if _port_in_use(port):
            raise StackError(
                f"port {port} ({component}) is in use by another process; stop it or set {env_var}"
            )


def wait_ports_free(ports: list[tuple[str, int, str]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    for component, port, env_var in ports:
        while _port_in_use(port):
            if time.monotonic() >= deadline:
                raise StackError(
                    f"port {port} ({component}) is still in use after stopping the stack: "
                    f"another process holds it; find it with `ss -ltnp` or set {env_var}"
                )
            time.sleep(POLL_S)


def http_ok(url: str, timeout_s: float) -> bool:
    try:
        # trust_env=False: an HTTP(S)_PROXY from the environment must not capture loopback.
        with httpx.Client(timeout=timeout_s, trust_env=False, follow_redirects=True) as http:
            return http.get(url).status_code == 200
    except httpx.HTTPError:
        return False
