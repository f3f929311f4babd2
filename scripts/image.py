"""Build the service's OCI image: ``bentoml build``, then ``bentoml containerize`` with the builder this machine has
(a running Docker engine, else podman, else buildah), then print the image's name and size.

Runs in its own process (``make image``; tests/test_image.py runs it the same way). Exits with status 2 and a
one-line reason when no builder exists, and with the failing command's status when a step fails.

Two build steps have stand-ins, each used only where the real thing cannot be reached (machines with no access to
image registries or to the PyTorch wheel index, such as the project's CI machines). Each prints a ``stand-in:`` line:

1. The base image ``python:3.11-slim`` (the ``FROM`` of the bento's Dockerfile): when it is neither present nor
   pullable, an equivalent is made from Debian 12's own packages with debootstrap (Python 3.11, pip, CA
   certificates; the official image is Debian 12 too) and imported under that name. It needs root and debootstrap.
2. The PyTorch CPU index (``--extra-index-url https://download.pytorch.org/whl/cpu``): when it cannot be reached,
   torch's CPU wheel comes from the local wheel folder pip is configured with (``find-links``), mounted read-only
   into the build. A copy of the bento (under ``--work``) gets ``--find-links /wheels`` in place of the index
   argument; the bento in the BentoML store stays as built.

Everything else is the real thing: BentoML's generated Dockerfile, PyPI for the other packages, BentoML's
containerize with the chosen backend.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENTOML = Path(sys.executable).with_name("bentoml")
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
INDEX_ARG = f"--extra-index-url {TORCH_INDEX}"
WHEELS_IN_BUILD = "/wheels"
# The official image's Debian release, and the mirror Debian's own images are built from.
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
CA_IN_IMAGE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's bundle path
APT_CLEAN = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""


class BuildError(Exception):
    """A step that cannot go on; the message is the reason for the user."""


def say(message: str) -> None:
    print(message, flush=True)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    say("+ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def succeeds(cmd: list[str], timeout_s: float = 120) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout_s).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pick_backend(requested: str) -> str:
    """The builder: the one asked for, else a Docker engine that answers, else podman, else buildah."""
    if requested != "auto":
        if not shutil.which(requested):
            raise BuildError(f"{requested} is not installed")
        return requested
    if shutil.which("docker") and succeeds(["docker", "info"], timeout_s=30):
        return "docker"
    for backend in ("podman", "buildah"):
        if shutil.which(backend):
            return backend
    raise BuildError("no image builder: install Docker, podman or buildah (`make image-tools` on Debian)")


def image_cli(backend: str) -> str:
    """The CLI that inspects and pulls images in the builder's store (podman shares buildah's)."""
    if backend == "docker":
        return "docker"
    if not shutil.which("podman"):
        raise BuildError(
            "the image's size and the base-image stand-in need podman next to buildah (`make image-tools`)"
        )
    return "podman"


def has_image(backend: str, name: str) -> bool:
    return succeeds([image_cli(backend), "image", "inspect", name])


def image_size_bytes(backend: str, name: str) -> int:
    out = subprocess.run(
        [image_cli(backend), "image", "inspect", "--format", "{{.Size}}", name], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise BuildError(f"cannot inspect the image {name}: {out.stderr.strip()}")
    return int(out.stdout.strip())


def pip_config(key: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True, check=False
    )
    return out.stdout.split() if out.returncode == 0 else []


def build_bento(bentofile: str) -> str:
    """``bentoml build`` in the BentoML store of the environment (BENTOML_HOME); the new bento's tag."""
    out = subprocess.run(
        [str(BENTOML), "build", "-f", bentofile, "--output", "tag", "."],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "True"},
    )
    if out.returncode != 0:
        raise BuildError(f"bentoml build failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    match = re.search(r"__tag__:(\S+)", out.stdout)
    if not match:
        raise BuildError(f"no tag in the output of bentoml build:\n{out.stdout[-3000:]}")
    return match.group(1)


def bento_path(tag: str) -> Path:
    import bentoml  # here, not at the top: the first steps need no BentoML

    return Path(bentoml.get(tag).path)


def base_image_of(bento: Path) -> str:
    match = re.search(r"^FROM (\S+)", (bento / "env" / "docker" / "Dockerfile").read_text(), flags=re.M | re.I)
    if not match:
        raise BuildError(f"no FROM in {bento}/env/docker/Dockerfile")
    return match.group(1)


def ensure_base_image(backend: str, name: str, work: Path) -> None:
    """The base image present in the builder's store: already there, pulled, or (stand-in 1) made with debootstrap."""
    if has_image(backend, name):
        return
    if succeeds([image_cli(backend), "pull", name], timeout_s=600):
        return
    if not re.fullmatch(r"python:3\.11-slim", name):
        raise BuildError(f"cannot pull the base image {name}, and there is no stand-in for it")
    if backend == "docker":
        raise BuildError(f"cannot pull {name}, and its stand-in is made with podman (`make image-tools`)")
    if os.geteuid() != 0 or not shutil.which("debootstrap"):
        raise BuildError(f"cannot pull {name}; the stand-in needs root and debootstrap (`make image-tools`)")
    say(f"stand-in: {name} cannot be pulled here; making it from Debian {DEBIAN_SUITE}'s packages (debootstrap)")
    ca_bundle = Path((pip_config("global.cert") or [CA_IN_IMAGE])[0])
    work.mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="base-rootfs-", dir=work))
    try:
        packages = "--include=python3.11,python3-pip,ca-certificates"
        run(
            ["debootstrap", "--variant=minbase", packages, DEBIAN_SUITE, rootfs, DEBIAN_MIRROR],
            stdout=subprocess.DEVNULL,
        )
        # The official image's pip installs system-wide and its python is /usr/local/bin/python.
        (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
        for link in ("python", "python3"):
            (rootfs / "usr/local/bin" / link).unlink(missing_ok=True)
            (rootfs / "usr/local/bin" / link).symlink_to("/usr/bin/python3.11")
        # The registries are reached through a proxy whose CA only the host's bundle holds.
        shutil.copyfile(ca_bundle, rootfs / CA_IN_IMAGE.lstrip("/"))
        # As in Debian's official images: no package lists, and apt deletes the packages it has installed.
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(APT_CLEAN)
        changes = [
            f"ENV PIP_CERT={CA_IN_IMAGE}",
            f"ENV SSL_CERT_FILE={CA_IN_IMAGE}",
            f"ENV REQUESTS_CA_BUNDLE={CA_IN_IMAGE}",
            "ENV UV_NATIVE_TLS=1",  # uv ignores the system CA store unless told
            "ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            'CMD ["python3"]',
        ]
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        args = [a for change in changes for a in ("--change", change)]
        run(["podman", "import", *args, "-", f"docker.io/library/{name}"], stdin=tar.stdout, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise BuildError("tar of the stand-in base image failed")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def torch_index_reachable() -> bool:
    try:
        urllib.request.urlopen(urllib.request.Request(TORCH_INDEX + "/", method="HEAD"), timeout=15)
    except urllib.error.HTTPError:
        return True  # it answered
    except OSError:
        return False
    return True


def torch_wheels(requirements: str) -> Path:
    """The local folder pip takes wheels from (``find-links``) that holds the pinned torch wheel."""
    match = re.search(r"^torch==(\S+)$", requirements, flags=re.M)
    if not match:
        raise BuildError("no torch pin in the bento's requirements")
    for folder in os.environ.get("PIP_FIND_LINKS", "").split() + pip_config("global.find-links"):
        folder = folder.removeprefix("file://")
        if list(Path(folder).glob(f"torch-{match.group(1)}-*.whl")):
            return Path(folder)
    raise BuildError(f"{TORCH_INDEX} cannot be reached and no local wheel folder has torch {match.group(1)}")


def with_local_torch(tag: str, bento: Path, work: Path) -> tuple[dict[str, str], Path]:
    """Stand-in 2: a copy of the bento, in a scratch store under ``work``, that takes torch from ``/wheels``."""
    wheels = torch_wheels((bento / "env" / "python" / "requirements.txt").read_text())
    say(f"stand-in: {TORCH_INDEX} cannot be reached here; torch comes from {wheels} (mounted at {WHEELS_IN_BUILD})")
    home = work / "bentoml-home"
    name, version = tag.split(":")
    copy = home / "bentos" / name / version
    shutil.rmtree(home / "bentos" / name, ignore_errors=True)
    shutil.copytree(bento, copy, symlinks=True)
    # The index is an argument of env/python/install.sh or a line of requirements.txt, by the bento's kind.
    for path in index_users(copy):
        path.write_text(path.read_text().replace(INDEX_ARG, f"--find-links {WHEELS_IN_BUILD}"))
    return {"BENTOML_HOME": str(home)}, wheels


def index_users(bento: Path) -> list[Path]:
    """The files of the bento's Python environment that name the PyTorch index."""
    return [p for p in sorted((bento / "env" / "python").glob("*")) if p.is_file() and INDEX_ARG in p.read_text()]


def containerize(backend: str, tag: str, image: str, env: dict[str, str], wheels: Path | None) -> None:
    cmd = [str(BENTOML), "containerize", tag, "--backend", backend, "--image-tag", image]
    if backend in ("podman", "buildah"):
        # Cached layers make a rebuild with unchanged requirements fast; chroot isolation builds where the OCI
        # runtime cannot (these machines' hybrid cgroups) and is as good for a build.
        cmd += ["--opt", "layers", "--opt", "isolation=chroot"]
    if wheels is not None:
        cmd += ["--opt", f"volume={wheels}:{WHEELS_IN_BUILD}:ro"]
    # BentoML 1.4.36+ rejects the bento's own Dockerfile template unless the temporary build context it copies the
    # bento to lies under the working directory (bentoml/BentoML#5566), hence containerize from the temp folder.
    run(cmd, env={**os.environ, "BENTOML_DO_NOT_TRACK": "True", **env}, cwd=tempfile.gettempdir())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bentofile", default="bentofile.yaml")
    parser.add_argument("--tag", default="infernet-torch-service:latest", help="the image's name")
    parser.add_argument("--backend", default="auto", choices=("auto", "docker", "podman", "buildah"))
    parser.add_argument("--work", type=Path, default=REPO / "build" / "image", help="scratch folder (gitignored)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        backend = pick_backend(args.backend)
        say(f"builder: {backend}")
        tag = build_bento(args.bentofile)
        bento = bento_path(tag)
        say(f"bento: {tag} ({bento})")
        ensure_base_image(backend, base_image_of(bento), args.work.resolve())
        env: dict[str, str] = {}
        wheels = None
        if index_users(bento) and not torch_index_reachable():
            env, wheels = with_local_torch(tag, bento, args.work.resolve())
        containerize(backend, tag, args.tag, env, wheels)
        size = image_size_bytes(backend, args.tag)
    except BuildError as exc:
        print(f"image: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"image: {' '.join(map(str, exc.cmd))} failed with status {exc.returncode}", file=sys.stderr)
        return exc.returncode or 1
    say(f"image: {args.tag} size_bytes={size} size_mb={size / 1e6:.0f} seconds={time.monotonic() - started:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
