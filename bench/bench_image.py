"""The Docker image, built from nothing and run: how long each step takes, how large the images are,
whether `make test` passes inside and whether the demo's UIs answer from the host. Writes JSON.

    python3 bench/bench_image.py                 # base image (once), both images, make test, the demo: about 1 h on 2 cores
    python3 bench/bench_image.py --build-only    # the images alone

Standard library only, so it runs before anything is installed; as root, beside a Docker daemon. It is
made for a machine like our CI's, with no registry of base images and no bridge network:

- The base image is made from Debian's packages: debootstrap writes a minimal bookworm into a folder and
  `docker import` makes it an image (transpeft-debian:bookworm), once; `--rebuild-base` makes it again.
- The build runs on the host's network (`--network host`), where the package registries are reached.
- pip finds the CPU torch wheel the way `make install` finds it outside: in the folders of pip's
  find-links (PIP_FIND_LINKS, or pip's configuration). They are served to the build on loopback for
  the Dockerfile's PIP_FIND_LINKS argument; without them pip would pull the CUDA build from PyPI.
- Certificate authorities the host adds (/usr/local/share/ca-certificates: a TLS-inspecting proxy's)
  are trusted in the build too, or pip and uv there could reach no registry.
- Two images: `transpeft` (the demo and its servers) and `transpeft:test` (the same layers, plus
  PostgreSQL and Chromium, which `make test` needs: the Dockerfile's TEST_TOOLS argument).
- `make test` runs in `transpeft:test` with no network at all (its servers are on the container's own
  loopback); the demo runs in `transpeft` on the host's network, its servers on free ports, and is
  done when the story prints where to look. Then the MLflow and Prefect UIs are fetched from the host,
  with the secrets the container was started with.

A daemon for such a machine (vfs storage, no iptables, no bridge):
    dockerd --storage-driver vfs --iptables=false --bridge=none &
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
BASE_IMAGE = "transpeft-debian:bookworm"
IMAGE, TEST_IMAGE = "transpeft", "transpeft:test"
DEMO_DONE = "The story took"  # the story's last paragraph begins so (transpeft/demo/story.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-only", action="store_true", help="build the images; run neither tests nor demo")
    parser.add_argument("--no-tests", action="store_true", help="the image and its demo; no test image, no make test")
    parser.add_argument("--rebuild-base", action="store_true", help=f"make {BASE_IMAGE} again with debootstrap")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for debootstrap")
    parser.add_argument("--logs", type=Path, default=ROOT / ".image-logs", help="where each step's full output goes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/image.json")
    args = parser.parse_args()
    check_daemon()
    args.logs.mkdir(parents=True, exist_ok=True)
    results: dict = {"docker": docker_facts()}

    results["base_image"] = base_image(args.mirror, args.rebuild_base, args.logs)
    with wheels_served() as find_links, host_certificates():
        results["pip_find_links"] = find_links or None
        images = [("image", IMAGE, [])] + ([] if args.no_tests else [("test_image", TEST_IMAGE, ["--build-arg",
                                                                                              "TEST_TOOLS=1"])])
        for name, tag, extra in images:
            built = build(tag, find_links, extra, args.logs / f"build-{name}.log")
            results[name] = {"tag": tag, **built, "size_mib": image_mib(tag)}
            write(args.out, results)
    if not args.build_only:
        if not args.no_tests:
            results["make_test"] = make_test(args.logs / "make-test.log")
            write(args.out, results)
        results["demo"] = demo(args.logs / "demo.log")
    write(args.out, results)
    print(json.dumps(results, indent=2))


def check_daemon() -> None:
    if shutil.which("docker") is None:
        sys.exit("bench_image: no `docker` command; install Debian's docker.io")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        sys.exit("bench_image: no Docker daemon answers; start one, here for example with\n"
                 "  dockerd --storage-driver vfs --iptables=false --bridge=none &")


def docker_facts() -> dict:
    info = json.loads(subprocess.run(["docker", "info", "--format", "{{json .}}"], capture_output=True,
                                     text=True, check=True).stdout)
    return {"server_version": info.get("ServerVersion"), "storage_driver": info.get("Driver"),
            "cpus": info.get("NCPU"), "memory_gib": round(info.get("MemTotal", 0) / 2**30, 1)}


def base_image(mirror: str, rebuild: bool, logs: Path) -> dict:
    """Debian bookworm, minimal, from debootstrap: the image the Dockerfile starts FROM here."""
    if not rebuild and subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode == 0:
        print(f"== base image: {BASE_IMAGE} is there already (--rebuild-base makes it again)", flush=True)
        return {"tag": BASE_IMAGE, "made_now": False, "size_mib": image_mib(BASE_IMAGE)}
    if shutil.which("debootstrap") is None:
        sys.exit("bench_image: no `debootstrap`; install Debian's debootstrap, or give an image with Python as BASE")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transpeft-rootfs-") as root:
        run_logged(["debootstrap", "--variant=minbase", "bookworm", root, mirror], logs / "debootstrap.log",
                   "base image: debootstrap")
        os.chmod(root, 0o755)  # the image's / is this folder: made 0700, no other user could reach a file
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True, capture_output=True)
        if tar.wait() != 0:
            sys.exit("bench_image: tar of the debootstrapped folder failed")
    return {"tag": BASE_IMAGE, "made_now": True, "seconds": round(time.perf_counter() - started, 1),
            "size_mib": image_mib(BASE_IMAGE)}


LOCAL_CAS = Path("/usr/local/share/ca-certificates")  # where Debian keeps the authorities a machine adds
CERTS = ROOT / ".image-certs"  # the Dockerfile installs what it finds here


class host_certificates:
    """The host's added certificate authorities, in the build context while the images build: behind a
    TLS-inspecting proxy, pip and uv in the build trust what pip and uv on the host trust."""

    def __enter__(self):
        shutil.rmtree(CERTS, ignore_errors=True)
        found = sorted(LOCAL_CAS.glob("*.crt")) if LOCAL_CAS.is_dir() else []
        if found:
            CERTS.mkdir()
            for cert in found:
                shutil.copy(cert, CERTS / cert.name)
            print(f"== certificates: {', '.join(c.name for c in found)} from {LOCAL_CAS} go into the build", flush=True)

    def __exit__(self, *exc):
        shutil.rmtree(CERTS, ignore_errors=True)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the build's own output says what pip fetched
        pass


class wheels_served:
    """pip's find-links folders, each served on a loopback port for the build: their URLs, space-separated."""

    def __init__(self):
        self.servers: list[http.server.ThreadingHTTPServer] = []

    def __enter__(self) -> str:
        urls = []
        for folder in find_links_folders():
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(_Quiet, directory=str(folder)))
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers.append(server)
            urls.append(f"http://127.0.0.1:{server.server_address[1]}/")
            print(f"== wheels: {folder} served to the build at {urls[-1]}", flush=True)
        return " ".join(urls)

    def __exit__(self, *exc):
        for server in self.servers:
            server.shutdown()


def find_links_folders() -> list[Path]:
    """The local folders among pip's find-links: PIP_FIND_LINKS, else pip's configuration."""
    value = os.environ.get("PIP_FIND_LINKS")
    if value is None:
        got = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                             capture_output=True, text=True)
        value = got.stdout if got.returncode == 0 else ""
    folders = []
    for link in value.split():
        path = Path(urlparse(link).path if link.startswith("file:") else link)
        if path.is_dir():
            folders.append(path)
    return folders


def build(tag: str, find_links: str, extra: list[str], log: Path) -> dict:
    command = ["docker", "build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}", *extra, "-t", tag]
    if find_links:
        command += ["--build-arg", f"PIP_FIND_LINKS={find_links}"]
    started = time.perf_counter()
    run_logged([*command, str(ROOT)], log, f"build {tag}", show=lambda line: line.startswith("Step "))
    return {"seconds": round(time.perf_counter() - started, 1)}


def image_mib(tag: str) -> float:
    size = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True,
                          text=True, check=True).stdout
    return round(int(size) / 2**20, 1)


def make_test(log: Path) -> dict:
    """`make test` in the test image, as CI runs it: no network, the servers on the container's loopback."""
    started = time.perf_counter()
    code = run_logged(["docker", "run", "--rm", "--network", "none", TEST_IMAGE, "make", "test"], log, "make test",
                      show=lambda line: " passed" in line or " failed" in line or "FAILED" in line, check=False)
    summary = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("=") and " in " in line]
    return {"seconds": round(time.perf_counter() - started, 1), "passed": code == 0, "summaries": summary}


def demo(log: Path) -> dict:
    """The image's own command, `make demo-and-serve`, on the host's network: done when the story ends; then
    the UIs, fetched from the host with the container's secrets."""
    password, prefect_secret = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    ports = {name: free_port() for name in ("PREFECT_PORT", "MLFLOW_PORT", "TRANSPEFT_WEBHOOK_PORT")}
    env = {"MLFLOW_TRACKING_PASSWORD": password, "PREFECT_API_AUTH_STRING": f"admin:{prefect_secret}", **ports}
    name = f"transpeft-demo-{os.getpid()}"
    command = ["docker", "run", "--rm", "--name", name, "--network", "host"]
    for key, value in env.items():
        command += ["-e", f"{key}={value}"]
    print(f"== demo: {' '.join(command[:6])} ... {IMAGE} (its UIs on ports {ports['PREFECT_PORT']} and "
          f"{ports['MLFLOW_PORT']})", flush=True)
    started = time.perf_counter()
    result: dict = {"ports": ports}
    with log.open("w") as out:
        container = subprocess.Popen([*command, IMAGE], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            lines = 0
            for line in container.stdout:
                out.write(line)
                lines += 1
                if line.startswith("== ") or line.startswith(DEMO_DONE):
                    print(f"  [{time.perf_counter() - started:5.0f}s] {line.rstrip()}", flush=True)
                if line.startswith(DEMO_DONE):
                    result.update(seconds=round(time.perf_counter() - started, 1), log_lines=lines,
                                  log_chars=log.stat().st_size)
                    break
            else:
                result.update(finished=False, exit_code=container.wait())
                return result
            time.sleep(5)  # the rest of the story's last paragraph
            result["ui"] = {
                "mlflow": fetch(f"http://127.0.0.1:{ports['MLFLOW_PORT']}/api/2.0/mlflow/registered-models/search",
                                "admin", password),
                "prefect": fetch(f"http://127.0.0.1:{ports['PREFECT_PORT']}/api/health", "admin", prefect_secret),
                "mlflow_without_password": fetch(f"http://127.0.0.1:{ports['MLFLOW_PORT']}/", None, None),
            }
            result["finished"] = True
        finally:
            subprocess.run(["docker", "stop", "-t", "20", name], capture_output=True)
            container.wait()
    return result


def fetch(url: str, user: str | None, password: str | None) -> dict:
    request = urllib.request.Request(url)
    if user is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
            return {"url": url, "status": response.status, "bytes": len(body),
                    "registered_models": len(json.loads(body).get("registered_models", []))
                    if "registered-models" in url else None}
    except urllib.error.HTTPError as e:
        return {"url": url, "status": e.code}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(command: list[str], log: Path, what: str, show=lambda line: False, check: bool = True) -> int:
    """Runs ``command`` with its whole output in ``log``, printing the lines ``show`` picks and a heartbeat."""
    print(f"== {what} (full output in {log})", flush=True)
    started = last = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            out.write(line)
            now = time.perf_counter()
            if show(line) or now - last > 60:
                print(f"  [{now - started:5.0f}s] {line.rstrip()[:160]}", flush=True)
                last = now
        code = process.wait()
    print(f"== {what}: exit {code} in {time.perf_counter() - started:.0f} s", flush=True)
    if check and code != 0:
        sys.exit(f"bench_image: {what} failed (exit {code}); the end of {log}:\n" + log.read_text()[-3000:])
    return code


def write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
