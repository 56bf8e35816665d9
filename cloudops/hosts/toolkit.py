"""The cloudops a hypervisor runs by itself (its metrics cron job): a virtualenv of its own, sent over SSH.

A host runs ``/opt/cloudops/venv/bin/cloudops metrics.ship --once --json --local`` from cron, so it
needs the same cloudops as the operator, installed on the host, never the operator's checkout.
Hypervisors have no internet, so nothing on them comes from PyPI. What comes from where, and why:

* Debian packages (``PACKAGES``, installed by deploy's ``packages`` step when ``metrics`` is set):
  venv support and everything compiled (libvirt's binding, PyYAML, cryptography, bcrypt, PyNaCl,
  MarkupSafe under Jinja2, wrapt under Deprecated, cffi under PyNaCl and bcrypt). Debian 12's versions meet cloudops's
  requirements and are built for the host's own Python, so nothing binary crosses from the
  control machine (whose architecture or libc may differ).
* Wheels uploaded with cloudops (``UPLOADED``): the pure-Python requirements whose Debian 12
  versions are too old (invoke 2.0 < 2.2, fabric 2.6 < 3.2, paramiko 2.12 < 3.4, whisper 1.1.4 <
  1.1.10), and rich (progress bars) with what it needs (markdown-it-py, mdurl, Pygments), so a host
  needs no package for it. They are repacked from the distributions installed beside this cloudops:
  the versions the operator runs, no network and no build. cloudops itself is built with ``pip wheel --no-deps
  --no-build-isolation`` from a copy of the checkout (setuptools is in every venv; nothing is
  fetched), or repacked the same way when it was installed from a wheel.
* On the host: ``/usr/bin/python3 -m venv --system-site-packages /opt/cloudops/venvs/<digest>``
  (it sees Debian's packages), ``pip install --no-index --find-links`` the wheels (pip checks that
  every requirement is met, by a wheel or by Debian), ``cloudops --list`` as a smoke test, then the
  symlink ``/opt/cloudops/venv`` is switched to it with one rename and older venvs are removed: a
  cron cycle starting meanwhile runs the old venv or the new one, never half of one.

The stamp (``cloudops <version> <digest>``; the digest covers cloudops's files and every uploaded
wheel's name and version) is the venv's ``cloudops-stamp`` file. ``ensure_toolkit`` compares it and
reinstalls only when it differs, so a second deploy says "already up to date" and builds nothing.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from cloudops import paths
from cloudops.errors import CloudopsError

BASE = "/opt/cloudops"
VENV = f"{BASE}/venv"
COMMAND = f"{VENV}/bin/cloudops"  # what the metrics cron entry runs
STAMP_FILE = f"{VENV}/cloudops-stamp"
UPLOADED = ("invoke", "fabric", "paramiko", "whisper", "rich", "markdown-it-py", "mdurl", "pygments")
PACKAGES = ("python3-venv", "python3-libvirt", "python3-yaml", "python3-jinja2", "python3-cryptography",
            "python3-bcrypt", "python3-nacl", "python3-cffi", "python3-decorator", "python3-deprecated", "python3-six")
_SOURCE = ("pyproject.toml", "README.md", "LICENSE")  # beside the package: what `pip wheel` of a checkout reads
_NOT_PACKED = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


@dataclass(frozen=True)
class Release:
    """What the hosts should run: cloudops's version and the digest of everything that goes with it."""

    version: str
    digest: str

    @property
    def stamp(self) -> str:
        return f"cloudops {self.version} {self.digest}"


# ---------------------------------------------------------------- here: what to send

def _version() -> str:
    try:
        return metadata.version("cloudops")
    except metadata.PackageNotFoundError:
        raise CloudopsError("cloudops is not installed here (no package metadata): cannot send it to the hosts") from None


def _source_files() -> list[Path]:
    """A checkout's files that make up the wheel: the package (no byte code) and the project files."""
    package = paths.ROOT / "cloudops"
    found = [p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return sorted(found) + [paths.ROOT / name for name in _SOURCE if (paths.ROOT / name).is_file()]


def release() -> Release:
    """The version and digest of this cloudops and its uploaded requirements (cheap: nothing is built)."""
    digest = hashlib.sha256()
    if paths.in_checkout():
        for path in _source_files():
            digest.update(str(path.relative_to(paths.ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    else:
        digest.update((metadata.distribution("cloudops").read_text("RECORD") or "").encode())
    for name in UPLOADED:
        digest.update(f"{name} {_dist(name).version}\0".encode())
    return Release(_version(), digest.hexdigest()[:12])


def _dist(name: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise CloudopsError(f"{name} is not installed beside cloudops here: cannot send it to the hosts") from None


def repack(name: str, out: Path) -> Path:
    """A wheel of the pure-Python distribution ``name`` as installed here, from its RECORD (byte code,
    scripts and installer files left out: pip makes them again on the host). Deterministic."""
    dist = _dist(name)
    if "Root-Is-Purelib: true" not in (dist.read_text("WHEEL") or "") or not dist.files:
        raise CloudopsError(f"{name} {dist.version} here was not installed from a pure-Python wheel: "
                            "cannot send it to the hosts")
    info_dir = next(f.parts[0] for f in dist.files if f.parts[0].endswith(".dist-info"))
    path = out / f"{info_dir[: -len('.dist-info')]}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for file in sorted(dist.files, key=str):
            rel = str(file)
            if rel.startswith("..") or "__pycache__" in file.parts or (file.parts[0] == info_dir and file.name in _NOT_PACKED):
                continue
            data = Path(file.locate()).read_bytes()
            _write(wheel, rel, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{rel},sha256={digest},{len(data)}")
        records.append(f"{info_dir}/RECORD,,")
        _write(wheel, f"{info_dir}/RECORD", ("\n".join(records) + "\n").encode())
    return path


def _write(wheel: zipfile.ZipFile, name: str, data: bytes) -> None:
    entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    entry.external_attr = 0o644 << 16
    entry.compress_type = zipfile.ZIP_DEFLATED
    wheel.writestr(entry, data)


def _build_cloudops(out: Path) -> None:
    if not paths.in_checkout():
        repack("cloudops", out)
        return
    with tempfile.TemporaryDirectory(prefix="cloudops-src-") as tmp:
        for path in _source_files():  # a copy: the build's build/ and egg-info never land in the checkout
            target = Path(tmp) / path.relative_to(paths.ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                               "--disable-pip-version-check", "-w", str(out), tmp], capture_output=True, text=True)
    if proc.returncode != 0:
        detail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "Warning" not in ln]
        raise CloudopsError(f"building the cloudops wheel failed: {detail[-1].strip() if detail else proc.returncode}")


_lock = threading.Lock()


def bundle(wanted: Release) -> list[Path]:
    """The wheels for ``wanted``, made once and kept in the state directory's cache (hosts deployed in
    parallel share one build; a later deploy of the same release builds nothing)."""
    directory = paths.var_dir() / "cache" / "host-cloudops" / wanted.digest
    with _lock:
        if not (directory / ".complete").exists():
            directory.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{wanted.digest}-", dir=directory.parent))
            try:
                _build_cloudops(staging)
                for name in UPLOADED:
                    repack(name, staging)
                (staging / ".complete").write_text(wanted.stamp + "\n")
                shutil.rmtree(directory, ignore_errors=True)
                staging.rename(directory)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return sorted(directory.glob("*.whl"))


# ---------------------------------------------------------------- there: install on a host

INSTALL = r"""set -eu
base={base}; venv="$base/venvs/{digest}"; wheels={wheels}
rm -rf "$venv"
/usr/bin/python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q --no-index --no-cache-dir --disable-pip-version-check --find-links "$wheels" \
    {requirement}
"$venv/bin/cloudops" --list >/dev/null
printf '%s\n' {stamp} > "$venv/cloudops-stamp"
ln -sfn "venvs/{digest}" "$base/.venv.new" && mv -T "$base/.venv.new" "$base/venv"
for old in "$base"/venvs/*; do [ "$old" = "$venv" ] || rm -rf "$old"; done
"""


def host_stamp(conn) -> str | None:
    """The stamp of the cloudops installed on the host, or None when there is none that runs."""
    out = conn.run(f"test -x {shlex.quote(COMMAND)} && cat {shlex.quote(STAMP_FILE)} 2>/dev/null || true",
                   hide=True, warn=True, in_stream=False).stdout.strip()
    return out or None


def ensure_toolkit(conn, wanted: Release | None = None, check: bool = False) -> tuple[bool, str]:
    """Make the host's /opt/cloudops/venv run ``wanted`` (default: this cloudops); (changed, what happened)."""
    wanted = wanted or release()
    current = host_stamp(conn)
    if current == wanted.stamp:
        return False, f"cloudops {wanted.version} ({wanted.digest}) in {VENV} already up to date"
    action = "updated" if current else "installed"
    if check:
        return True, f"cloudops {wanted.version} ({wanted.digest}) would be {action} in {VENV}"
    wheels = bundle(wanted)
    conn.run(f"mkdir -p {shlex.quote(BASE)}", hide=True, in_stream=False)
    upload = conn.run(f"mktemp -d {shlex.quote(BASE)}/.upload-XXXXXX", hide=True, in_stream=False).stdout.strip()
    try:
        for wheel in wheels:
            conn.put(str(wheel), f"{upload}/{wheel.name}")
        script = INSTALL.format(base=shlex.quote(BASE), digest=shlex.quote(wanted.digest), wheels=shlex.quote(upload),
                                requirement=shlex.quote(f"cloudops=={wanted.version}"), stamp=shlex.quote(wanted.stamp))
        result = conn.run(script, hide=True, warn=True, in_stream=False, timeout=300)
        if result.exited != 0:
            lines = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.strip()]
            raise CloudopsError(f"installing cloudops in {VENV} failed: {lines[-1].strip() if lines else result.exited} "
                                f"(it needs the Debian packages {' '.join(PACKAGES)}: `deploy` with metrics set "
                                "installs them)")
    finally:
        conn.run(f"rm -rf {shlex.quote(upload)}", hide=True, warn=True, in_stream=False)
    return True, f"cloudops {wanted.version} ({wanted.digest}) {action} in {VENV}"
