"""Podman plumbing for the container tests (`make container-test`): helpers and session fixtures.

`docs/CONTAINERS.md` explains each step (podman without a Docker engine or a registry); this file does
exactly that, so that CI (root, fresh machine) needs nothing installed beforehand:

1. install podman, runc and debootstrap with apt-get when podman is missing;
2. use runc with cgroupfs and no default ulimits (a private `containers.conf`);
3. build a local Debian base image once with debootstrap (CI reaches no public registry) and keep
   it between runs; `MODELSERVE_TEST_BASE_IMAGE=python:3.12-slim` uses a pullable base instead;
4. build the serving image with `--format docker` (keeps `HEALTHCHECK`) and the host CA bundle mounted so
   that `pip install` inside the build reaches the package index;
5. run it read-only, with every capability dropped, on a free published port.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_BASE_IMAGE = "localhost/modelserve-base:bookworm"
IMAGE = "localhost/modelserve:container-test"
CONTAINER_PORT = 8000
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
"""

# Generous limits: CI runs this on a fresh machine with two shared cores.
INSTALL_TIMEOUT_S = 600
BASE_TIMEOUT_S = 600
BUILD_TIMEOUT_S = 900
READY_TIMEOUT_S = 120


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _debian_mirror() -> str:
    """The Debian mirror apt already uses on this machine (never a hard-coded host)."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.exists():
        for line in deb822.read_text().splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if "security" not in uri:
                        return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            match = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)", line)
            if match and "security" not in match.group(1):
                return match.group(1)
    pytest.fail("no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list")


@dataclass
class Podman:
    """Runs `podman --runtime runc ...` with the private containers.conf."""

    conf: Path
    log: list[str] = field(default_factory=list)

    def run(
        self, *args: str, timeout: float = 120, check: bool = True, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        cmd = ["podman", "--runtime", "runc", *args]
        self.log.append(" ".join(cmd))
        proc = subprocess.run(
            cmd,
            env=env,
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"{' '.join(cmd[:6])} ... exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
            )
        return proc

    def image_exists(self, ref: str) -> bool:
        return self.run("image", "exists", ref, check=False).returncode == 0


def _ensure_podman_installed() -> None:
    if shutil.which("podman") and shutil.which("runc"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.fail("podman and runc are missing; install them (apt-get install podman runc debootstrap)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-q"],
        # With recommends, as in docs/CONTAINERS.md; iptables for published ports.
        ["apt-get", "install", "-y", "-q", "podman", "runc", "debootstrap", "iptables"],
    ):
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
        )
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    """podman set up as docs/CONTAINERS.md describes (installed on first use)."""
    _ensure_podman_installed()
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return Podman(conf=conf)


def _build_local_base(podman: Podman) -> None:
    """Debian bookworm minbase + python3 (3.11) + venv + CA certificates, imported as an image."""
    if os.geteuid() != 0:
        pytest.fail("building the local base image needs root (debootstrap)")
    if not shutil.which("debootstrap"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "debootstrap"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            timeout=INSTALL_TIMEOUT_S,
            check=True,
        )
    with tempfile.TemporaryDirectory(prefix="modelserve-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        proc = subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(rootfs),
                _debian_mirror(),
            ],
            capture_output=True,
            text=True,
            timeout=BASE_TIMEOUT_S,
            check=False,
        )
        if proc.returncode != 0:
            pytest.fail(f"debootstrap failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        # Downloaded .debs and apt lists are not part of a base image.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.run(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
            capture_output=True,
            timeout=BASE_TIMEOUT_S,
            check=True,
        )
        env = {**os.environ, "CONTAINERS_CONF": str(podman.conf)}
        imported = subprocess.run(
            ["podman", "import", "-", LOCAL_BASE_IMAGE],
            input=tar.stdout,
            env=env,
            capture_output=True,
            timeout=BASE_TIMEOUT_S,
            check=False,
        )
        if imported.returncode != 0:
            pytest.fail(f"podman import failed:\n{imported.stderr.decode()[-3000:]}")


@pytest.fixture(scope="session")
def base_image(podman: Podman) -> str:
    """The image the Dockerfile builds FROM: a pullable one if asked for, else the cached local one."""
    override = os.environ.get("MODELSERVE_TEST_BASE_IMAGE")
    if override:
        return override
    if not podman.image_exists(LOCAL_BASE_IMAGE):
        _build_local_base(podman)
    return LOCAL_BASE_IMAGE


@dataclass(frozen=True)
class BuiltImage:
    ref: str
    size_bytes: int
    build_seconds: float


@pytest.fixture(scope="session")
def image(podman: Podman, base_image: str) -> BuiltImage:
    """The serving image, built from the working tree."""
    args = ["build", "--format", "docker", "--build-arg", f"BASE_IMAGE={base_image}", "-t", IMAGE]
    if CA_BUNDLE.exists():
        args += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    started = time.monotonic()
    podman.run(*args, "-f", str(REPO_ROOT / "Dockerfile"), str(REPO_ROOT), timeout=BUILD_TIMEOUT_S)
    seconds = time.monotonic() - started
    size = int(podman.run("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    return BuiltImage(ref=IMAGE, size_bytes=size, build_seconds=seconds)


@dataclass
class RunningContainer:
    podman: Podman
    cid: str
    base_url: str
    ready_seconds: float

    def logs(self) -> str:
        proc = self.podman.run("logs", self.cid, check=False)
        return proc.stdout + proc.stderr

    def inspect(self, template: str) -> str:
        return self.podman.run("inspect", "--format", template, self.cid).stdout.strip()

    def exec(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return self.podman.run("exec", self.cid, *cmd, check=False)


def http_request(
    method: str, url: str, body: object | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP exchange with the stdlib (no client library can hide a wrong status)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def _wait_ready(container: RunningContainer, deadline_s: float) -> None:
    url = f"{container.base_url}/v2/health/ready"
    end = time.monotonic() + deadline_s
    last = "no answer yet"
    while time.monotonic() < end:
        state = container.inspect("{{.State.Status}}")
        if state not in {"running", "created", "configured"}:
            pytest.fail(f"container stopped while starting ({state}); logs:\n{container.logs()[-4000:]}")
        with contextlib.suppress(OSError):
            status, _, body = http_request("GET", url, timeout=2)
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        time.sleep(0.5)
    pytest.fail(f"not ready after {deadline_s:.0f} s (last: {last}); logs:\n{container.logs()[-4000:]}")


@contextlib.contextmanager
def run_container(podman: Podman, image: str, *extra: str) -> Iterator[RunningContainer]:
    """Run the image as production would: read-only root, no capabilities, tmpfs /tmp."""
    port = free_port()
    cid = podman.run(
        "run",
        "-d",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--tmpfs",
        "/tmp:rw,size=64m,mode=1777",
        "-p",
        f"127.0.0.1:{port}:{CONTAINER_PORT}",
        *extra,
        image,
    ).stdout.strip()
    started = time.monotonic()
    container = RunningContainer(podman=podman, cid=cid, base_url=f"http://127.0.0.1:{port}", ready_seconds=0)
    try:
        _wait_ready(container, READY_TIMEOUT_S)
        container.ready_seconds = time.monotonic() - started
        yield container
    finally:
        podman.run("rm", "-f", "-t", "5", cid, check=False, timeout=60)
