"""A real Milvus standalone server for tests and benchmarks, confined to loopback.

`milvus-server` (PyPI ``milvus==2.3.5``, installed by `make install` into a separate tools
environment) runs Milvus and its embedded etcd; its gRPC ports listen on every interface, whatever
the config says. So the server runs in a private network namespace that holds only a loopback
device (``unshare --net``, root needed): it can reach nothing but itself, and its default ports
can never clash with anything on the host. The client reaches it through `NamespaceBridge`: a
listener on 127.0.0.1 of the host namespace whose upstream sockets are created *inside* the
server's namespace (a socket belongs to the namespace of the thread that made it; one thread
enters the namespace with setns(2) and only opens sockets).

The bridge keeps its port across restarts, so a URI saved in an index stays valid.
"""
from __future__ import annotations

import ctypes
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

#: Where `make install` puts the tools environment; override with VIDSEEK_MILVUS_SERVER.
DEFAULT_SERVER_COMMAND = Path(__file__).resolve().parents[1] / ".tools" / "milvus" / "bin" / "milvus-server"
PROXY_PORT = 19530  # inside the namespace every default port is free
START_TIMEOUT_S = 180.0  # milvus-server's own limit; ~12 s idle, minutes on a heavily loaded machine
READY_MARKER = "Ctrl+C to exit"  # printed by milvus-server once its health check passed
STOP_TIMEOUT_S = 30.0
CLONE_NEWNET = 0x40000000


def server_command() -> Path:
    """The milvus-server executable: $VIDSEEK_MILVUS_SERVER or the repo's .tools/milvus."""
    return Path(os.environ.get("VIDSEEK_MILVUS_SERVER", DEFAULT_SERVER_COMMAND))


class NamespaceBridge:
    """127.0.0.1:`port` in this namespace → 127.0.0.1:`target_port` in another one."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._namespace_fd: int | None = None
        self._requests: queue.Queue = queue.Queue()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._namespace_thread, daemon=True, name="netns-connector").start()
        threading.Thread(target=self._accept_loop, daemon=True, name="netns-bridge").start()

    def retarget(self, namespace_path: str) -> None:
        """Send new connections into the namespace at `namespace_path` (e.g. /proc/PID/ns/net)."""
        fd = os.open(namespace_path, os.O_RDONLY)
        old, self._namespace_fd = self._namespace_fd, fd
        if old is not None:
            os.close(old)

    def _namespace_thread(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        joined: int | None = None
        while not self._closed.is_set():
            try:
                reply = self._requests.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                if self._namespace_fd is None:
                    raise ConnectionRefusedError("no server namespace yet")
                if joined != self._namespace_fd:
                    if libc.setns(self._namespace_fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns into the server's network namespace failed")
                    joined = self._namespace_fd
                reply.put(socket.create_connection(("127.0.0.1", self.target_port), timeout=5))
            except OSError as err:
                reply.put(err)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            reply: queue.Queue = queue.Queue()
            self._requests.put(reply)
            upstream = reply.get()
            if isinstance(upstream, Exception):
                client.close()
                continue
            upstream.settimeout(None)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        if self._namespace_fd is not None:
            os.close(self._namespace_fd)


class LoopbackMilvusServer:
    """Start / stop / restart a Milvus server on `data_dir` inside a loopback-only namespace.

    >>> server = LoopbackMilvusServer(tmp / "milvus"); server.start(); server.uri  # http://127.0.0.1:PORT
    """

    def __init__(self, data_dir: str | Path, command: str | Path | None = None):
        self.data_dir = Path(data_dir)
        self.command = Path(command) if command is not None else server_command()
        self.bridge = NamespaceBridge(PROXY_PORT)
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self._process: subprocess.Popen | None = None
        self._log_offset = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.bridge.port}"

    @property
    def namespace_path(self) -> str:
        assert self._process is not None, "server not started"
        return f"/proc/{self._process.pid}/ns/net"

    def start(self) -> None:
        """Start the server and wait until it answers; RuntimeError with the reason otherwise."""
        if not self.command.is_file():
            raise RuntimeError(f"milvus-server not found at {self.command}: run `make install` (it installs "
                               f"milvus==2.3.5 into .tools/milvus) or set VIDSEEK_MILVUS_SERVER")
        for tool in ("setpriv", "unshare", "ip", "nsenter"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"`{tool}` is missing: the Milvus test runs the server in a loopback-only "
                                   f"network namespace (util-linux unshare, iproute2 ip)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._share_unpacked_binaries()
        self._log_offset = self.log_path.stat().st_size if self.log_path.is_file() else 0
        log = open(self.log_path, "ab")
        script = 'ip link set lo up && exec "$0" "$@"'
        # setpriv: if this process dies, unshare dies, and --kill-child takes the server with it.
        # (Not a preexec_fn: a plain fork() runs gRPC's fork handlers, which abort the child.)
        # --mount-proc: Milvus reads its memory use from /proc/<own pid>; with the host's /proc in a
        # new pid namespace that fails and sealed segments never load after a restart.
        self._process = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "--",
             "sh", "-c", script, str(self.command), "--data", str(self.data_dir), "--proxy-port", str(PROXY_PORT)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self._wait_for_namespace()
        self.bridge.retarget(self.namespace_path)
        self._wait_until_ready()

    def _share_unpacked_binaries(self) -> None:
        """milvus-server unpacks ~246 MB of binaries into DATA/bin on a fresh folder (over a minute
        on a loaded machine) and skips files whose checksum marker matches: point DATA/bin at one
        cache beside the tools environment, filled by the first start."""
        cache = self.command.resolve().parents[1] / "var" / "milvus-bin"
        cache.mkdir(parents=True, exist_ok=True)
        link = self.data_dir / "bin"
        if not link.exists():
            link.symlink_to(cache, target_is_directory=True)

    def _wait_for_namespace(self) -> None:
        own = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"cannot create a network namespace for Milvus (unshare exited "
                                   f"{self._process.returncode}; needs root): {self.log_tail()}")
            try:
                if os.stat(self.namespace_path).st_ino != own and self.interfaces() == ["lo"]:
                    return
            except (FileNotFoundError, subprocess.CalledProcessError):
                pass
            time.sleep(0.05)
        raise RuntimeError("the Milvus server's network namespace did not come up within 30 s")

    def interfaces(self) -> list[str]:
        """Network interfaces (UP or not) in the server's namespace: only "lo" when confined."""
        out = subprocess.run(["nsenter", f"--net={self.namespace_path}", "ip", "-o", "link"],
                             check=True, capture_output=True, text=True).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]

    def _wait_until_ready(self) -> None:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + START_TIMEOUT_S
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"milvus-server exited with {self._process.returncode} while starting: "
                                   f"{self.log_tail()}")
            if not self._log_says_ready():
                time.sleep(0.5)
                continue
            try:
                client = MilvusClient(self.uri, timeout=5)
                client.list_collections()
                client.close()
                return
            except Exception as err:  # noqa: BLE001 - pymilvus raises many types while the server boots
                last_error = f"{type(err).__name__}: {err}"
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"milvus-server did not answer within {START_TIMEOUT_S:.0f} s ({last_error}): "
                           f"{self.log_tail()}")

    def _log_says_ready(self) -> bool:
        # Waiting for the banner also keeps a quick stop() from interrupting it (a traceback).
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            return READY_MARKER.encode() in log.read()

    def log_tail(self, lines: int = 5) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])

    def _wrapper_pid(self) -> int | None:
        """The milvus-server wrapper: unshare's forked child (it handles SIGINT by stopping Milvus)."""
        pid = self._process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            return None
        return int(children[0]) if children else None

    def stop(self) -> None:
        """SIGINT to milvus-server (its clean shutdown), then wait; SIGKILL only past the timeout."""
        if self._process is None:
            return
        wrapper = self._wrapper_pid()
        if wrapper is not None and self._process.poll() is None:
            os.kill(wrapper, signal.SIGINT)
        try:
            self._process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()  # --kill-child: the namespace's init, and with it every process in it
            self._process.wait(timeout=10)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self.bridge.close()
