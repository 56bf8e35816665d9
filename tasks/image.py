"""Image tasks: image.build (bootable qcow2 from a recipe) and image.customize (offline edits with libguestfs)."""

import getpass
import sys
from pathlib import Path

from invoke import task

from cloudops.errors import CloudopsError
from tasks._cli import emit_json, user_errors


def _progress(message: str) -> None:
    print(f"image: {message}", file=sys.stderr, flush=True)


def _split(values) -> list[str]:
    """Repeatable options that also take comma-separated lists: ['a,b', 'c'] -> ['a', 'b', 'c']."""
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def _read_password(root_password_file, password_stdin, password) -> str | None:
    given = [x for x in (root_password_file, password_stdin, password) if x]
    if len(given) > 1:
        raise CloudopsError("give only one of --root-password-file, --password-stdin, --password")
    if root_password_file:
        try:
            text = Path(root_password_file).expanduser().read_text()
        except OSError as exc:
            raise CloudopsError(f"cannot read password file {root_password_file}: {exc.strerror}") from None
        return text.rstrip("\r\n")
    if password_stdin:
        if sys.stdin.isatty():
            return getpass.getpass("root password: ")
        return sys.stdin.readline().rstrip("\r\n")
    if password:
        print("image: warning: --password is visible in the process list and shell history; "
              "prefer --root-password-file or --password-stdin", file=sys.stderr)  # fmt: skip
        return password
    return None


def _files(specs) -> dict:
    result = {}
    for spec in specs or ():
        guest, sep, local = spec.partition(":")
        if not sep or not guest or not local:
            raise CloudopsError(f"--file {spec!r}: expected GUEST_PATH:LOCAL_PATH")
        result[guest] = Path(local).expanduser()
    return result


@task(
    help={
        "recipe": "recipe name in cloudops/recipes (default: image.recipe from the configuration, else tiny)",
        "force": "rebuild even if a cached image with the same inputs exists",
        "json": "print the result as JSON",
    }
)
@user_errors
def build(c, recipe=None, force=False, json=False):
    """Build a bootable qcow2 image from a recipe (cached by content hash; prints its path)."""
    from cloudops.imagebuild import build_image

    name = recipe or (c.config.get("image") or {}).get("recipe") or "tiny"
    path = build_image(name, force=force, progress=_progress)
    if json:
        emit_json({"recipe": name, "path": str(path), "size": path.stat().st_size})
    else:
        print(path)


@task(
    iterable=["ssh_key", "file"],
    help={
        "disk": "disk image(s) to edit in place: a path, or several separated by commas (one appliance for all)",
        "root_password_file": "file whose first line is root's new password",
        "password_stdin": "read root's new password from stdin (prompted if stdin is a terminal)",
        "password": "root's new password (visible in the process list: prefer the two options above)",
        "ssh_key": "public key file (.pub) for root's authorized_keys; repeatable or comma-separated",
        "hostname": "new hostname (/etc/hostname and the 127.0.1.1 line of /etc/hosts)",
        "file": "GUEST_PATH:LOCAL_PATH to copy into every disk; repeatable",
        "json": "print the per-disk report as JSON",
    },
)
@user_errors
def customize(c, disk, root_password_file=None, password_stdin=False, password=None, ssh_key=None, hostname=None,
              file=None, json=False):  # fmt: skip
    """Edit disk images offline: hostname, root SSH keys, root password, files (one libguestfs launch)."""
    from cloudops.customize import customize_image
    from cloudops.guestconfig import read_ssh_key_files

    disks = _split(disk)
    keys = read_ssh_key_files(_split(ssh_key)) if ssh_key else []
    files = _files(file)
    root_password = _read_password(root_password_file, password_stdin, password)
    report = customize_image(disks, root_password=root_password, ssh_keys=keys, hostname=hostname, files=files,
                             progress=_progress)  # fmt: skip
    if json:
        emit_json(report)
        return
    for path, result in report.items():
        changed = ", ".join(result["changed"]) or "no changes"
        print(f"{path}: {changed}")
