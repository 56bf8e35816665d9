"""SHA-512 crypt hashes: format, random salt, verification."""

import pytest

from cloudops import passwords
from cloudops.errors import CloudopsError


def test_hash_is_sha512_crypt_with_random_salt():
    first = passwords.hash_password("correct horse")
    second = passwords.hash_password("correct horse")
    assert first.startswith("$6$") and second.startswith("$6$")
    salt = first.split("$")[2]
    assert len(salt) == 16
    assert first != second, "two hashes of one password must differ (random salt)"
    assert "correct horse" not in first
    assert passwords.is_hash(first)


def test_verify():
    hashed = passwords.hash_password("s3cret!")
    assert passwords.verify("s3cret!", hashed)
    assert not passwords.verify("s3cret", hashed)
    assert not passwords.verify("", hashed)
    assert not passwords.verify("s3cret!", "s3cret!"), "a plaintext is not a hash"
    assert not passwords.verify("s3cret!", "*")


def test_verify_known_vector():
    # From the glibc SHA-crypt specification (rounds=5000 default, salt "saltstring").
    known = "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
    assert passwords.verify("Hello world!", known)


@pytest.mark.parametrize("bad", ["", "two\nlines", "nul\0"])
def test_bad_passwords_refused(bad):
    with pytest.raises(CloudopsError):
        passwords.hash_password(bad)


@pytest.mark.parametrize("value", ["plain text", "root:x", "$6$salt$has space", "$6$a$b\n", ""])
def test_is_hash_rejects_non_hashes(value):
    assert not passwords.is_hash(value)


# ---------------------------------------------------------------- where passwords come from, where they go

import io  # noqa: E402
import os  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from cloudops import hostfiles  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).parent / "invoke")


@pytest.fixture
def fresh_env(monkeypatch):
    monkeypatch.setattr(passwords, "_taken", [])
    return monkeypatch


def test_command_line_password_is_refused_in_one_line(fresh_env):
    with pytest.raises(CloudopsError, match="--password-file") as info:
        passwords.read_root_password(command_line="hunter2")
    assert "\n" not in str(info.value) and "hunter2" not in str(info.value)


def test_environment_password_is_taken_out_of_the_environment(fresh_env):
    fresh_env.setenv(passwords.PASSWORD_ENV, "env-secret")
    assert passwords.read_root_password() == "env-secret"
    assert passwords.PASSWORD_ENV not in os.environ
    child = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
    assert "env-secret" not in child and passwords.PASSWORD_ENV not in child
    assert passwords.take_from_environment() == "env-secret", "later callers still get it"


def test_environment_password_is_removed_even_when_a_file_is_used(fresh_env, tmp_path):
    fresh_env.setenv(passwords.PASSWORD_ENV, "env-secret")
    pw = tmp_path / "pw"
    passwords.write_private(pw, "from-file\nsecond line\n")
    assert passwords.read_root_password(file=pw) == "from-file"
    assert passwords.PASSWORD_ENV not in os.environ


def test_importing_the_tasks_removes_the_variable_for_every_task():
    code = ("import os; import cloudops.tasks; import subprocess; "
            "print(os.environ.get('CLOUDOPS_ROOT_PASSWORD')); print(subprocess.run(['env'], capture_output=True, "
            "text=True).stdout.count('canary-pw'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "CLOUDOPS_ROOT_PASSWORD": "canary-pw"}).stdout.split()
    assert out == ["None", "0"]


def test_write_private_is_0600_from_creation_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        passwords.write_private(tmp_path / "pw", "x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "pw").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        passwords.write_private(tmp_path / "pw", "y\n")


class RecordingConn:
    def __init__(self):
        self.calls = []

    def run(self, command, **kwargs):
        self.calls.append(("run", command))

        class R:
            ok, exited, stdout = True, 0, ""
        return R()

    def put(self, local, remote=None, preserve_mode=True):
        self.calls.append(("put", remote, preserve_mode))


def test_put_private_makes_the_file_0600_before_any_content():
    conn = RecordingConn()
    hostfiles.put_private(conn, io.BytesIO(b"$6$hash"), "/var/lib/cloudops/disks/web1-seed.iso")
    kinds = [c[0] for c in conn.calls]
    assert kinds == ["run", "put", "run"]
    create, put, rename = conn.calls
    assert create[1].startswith("umask 077 && ") and ": > " in create[1]
    tmp = put[1]
    assert tmp.startswith("/var/lib/cloudops/disks/web1-seed.iso.partial-") and tmp in create[1]
    assert put[2] is False, "Fabric must not copy the local file's mode over the 0600 file"
    assert rename[1].startswith("mv -f ") and "chmod" not in rename[1]


def test_ensure_file_creates_the_temporary_file_0600_before_writing():
    conn = RecordingConn()
    current = hostfiles.RemoteFile("/root/.ssh/cloudops_migration", None)
    hostfiles.ensure_file(conn, current, "PRIVATE KEY\n", "600", dir_mode="700")
    runs = [c for c in conn.calls]
    put_at = next(i for i, c in enumerate(runs) if c[0] == "put")
    assert any(c[0] == "run" and c[1].startswith("umask 077") for c in runs[:put_at])


@pytest.mark.skipif(not __import__("shutil").which("genisoimage"), reason="genisoimage missing")
def test_seed_iso_is_0600_whatever_the_umask(tmp_path):
    from cloudops.compute import seed

    old = os.umask(0)
    try:
        path = seed.make_seed(tmp_path / "seed.iso", "web1", password_hash=passwords.hash_password("pw"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("argv, pointer", [
    (["vm.start", "--name=web1", "--password=hunter2"], "--password-file"),
    (["image.customize", "--disk=/nonexistent.qcow2", "--password=hunter2"], "--root-password-file"),
])
def test_cli_refuses_password_option(argv, pointer, tmp_path):
    env = {**os.environ, "CLOUDOPS_INVENTORY": str(tmp_path / "none.yaml")}
    proc = subprocess.run([INVOKE, *argv], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and pointer in lines[0] and "--password-stdin" in lines[0], proc.stderr
    assert "hunter2" not in proc.stderr + proc.stdout
