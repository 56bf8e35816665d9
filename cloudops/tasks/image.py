"""Image tasks: image.build (bootable qcow2 from a recipe) and image.customize (offline edits with libguestfs)."""

import sys
from pathlib import Path

from invoke import task

from cloudops.errors import CloudopsError
from cloudops.inventory import hypervisors
from cloudops.tasks._cli import emit_json, user_errors


def _progress(message: str) -> None:
    print(f"image: {message}", file=sys.stderr, flush=True)


def _split(values) -> list[str]:
    """Repeatable options that also take comma-separated lists: ['a,b', 'c'] -> ['a', 'b', 'c']."""
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values or () for item in value.split(",") if item.strip()]


def _read_password(root_password_file, password_stdin, password) -> str | None:
    from cloudops import passwords

    return passwords.read_root_password(root_password_file, password_stdin, password,
                                        file_option="--root-password-file")


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
        "recipe": "recipe name in cloudops/imaging/recipes (default: image.recipe from the configuration, else tiny)",
        "force": "rebuild even if a cached image with the same inputs exists",
        "add": "also add it to the image store under the recipe's name (replacing an older build)",
        "json": "print the result as JSON",
    }
)
@user_errors
def build(c, recipe=None, force=False, add=False, json=False):
    """Build a bootable qcow2 image from a recipe (cached by content hash; prints its path, or its id with --add)."""
    from cloudops.imaging.build import build_image

    name = recipe or (c.config.get("image") or {}).get("recipe") or "tiny"
    path = build_image(name, force=force, progress=_progress)
    result = {"recipe": name, "path": str(path), "size": path.stat().st_size}
    if add:
        from cloudops.imaging import store as images

        image, changed = images.add_image(path, name=name, replace=True)
        result.update(id=image.id, added=changed)
    if json:
        emit_json(result)
    else:
        print(result.get("id") or path)


@task(
    iterable=["ssh_key", "file"],
    help={
        "disk": "disk image(s) to edit in place: a path, or several separated by commas (one appliance for all)",
        "root_password_file": "file whose first line is root's new password",
        "password_stdin": "read root's new password from stdin (prompted if stdin is a terminal)",
        "password": "refused (visible in the process list): use one of the two options above",
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
    from cloudops.compute.guestconfig import read_ssh_key_files
    from cloudops.imaging.customize import customize_image

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


# ---------------------------------------------------------------- the image store

@task(help={"path": "qcow2 or raw disk image file, or an http(s) URL to download it from (resumed when interrupted)",
            "name": "name in the store (default: the file name up to its first dot)",
            "sha256": "expected sha256: refuse the image if it differs",
            "sha512": "expected sha512: refuse the image if it differs",
            "checksums": "URL or file of a checksum list (SHA512SUMS, SHA256SUMS, BSD style): refuse the image "
                         "unless its entry for the file's name matches",
            "timeout": "seconds a download may wait to connect or for data (default: config image.download_timeout)",
            "replace": "move the name to this image if another image has it",
            "distribute": "also copy it now to the selected hosts (default: on first use)",
            "hosts": "hosts to copy to (with --distribute)", "group": "group(s) to copy to (with --distribute)",
            "inventory": "inventory file", "json": "print JSON",
            "way": "with --distribute: tree (hosts that hold it serve the next ones; the default, config "
                   "image.distribute_way), parallel or sequential (from this machine)"})
@user_errors
def add(c, path, name=None, sha256=None, replace=False, distribute=False, hosts=None, group=None, inventory=None,
        json=False, sha512=None, checksums=None, timeout=None, way=None):  # new options last: the older short flags stay
    """Add a disk image (a file or an http(s) URL) to the content-addressed store; prints its id."""
    from cloudops.imaging import store as images
    from cloudops.tasks._cli import finish, progress, select_hosts

    wait = timeout or (c.config.get("image") or {}).get("download_timeout") or 30
    try:
        wait = float(wait)
    except ValueError:
        raise CloudopsError(f"--timeout {wait!r} is not a number of seconds") from None
    image, changed = images.add_from(path, name=name, sha256=sha256, sha512=sha512, checksums=checksums,
                                     replace=replace, progress=progress, timeout=wait)
    if distribute:
        targets = hypervisors(select_hosts(c, hosts, group, None, inventory))
        way = way or (c.config.get("image") or {}).get("distribute_way")
        finish(images.distribute(image, targets, progress=progress, way=way), json)
    if json:
        emit_json({**image.__dict__, "changed": changed})
    else:
        print(image.id if changed else f"{image.id} (already in the store, nothing to do)")


@task(name="list", help={"hosts": "hosts to ask which images they hold (default: all hypervisors)",
                         "group": "group(s) to ask", "inventory": "inventory file", "json": "print JSON",
                         "local": "only the local store, do not ask any host"})
@user_errors
def list_(c, hosts=None, group=None, inventory=None, json=False, local=False):
    """Images in the store: name, id, format, virtual size, and the hosts that hold them."""
    from cloudops import output
    from cloudops.imaging import store as images
    from cloudops.tasks._cli import select_hosts

    held = {}
    if not local:
        targets = hypervisors(select_hosts(c, hosts, group, None, inventory))
        held = images.holders(targets)
    rows = [{"name": i.name, "id": i.id[:12], "format": i.format, "virtual_size": f"{i.virtual_size >> 20} MiB",
             "direct_boot": i.direct_boot, "hosts": ",".join(held.get(i.id, [])) or "-", "full_id": i.id}
            for i in images.list_images()]
    if json:
        emit_json(rows)
    elif rows:
        print(output.table(rows, ["name", "id", "format", "virtual_size", "direct_boot", "hosts"]))
    else:
        print("no images (add one with `invoke image.add FILE` or `invoke image.build --add`)")


@task(help={"image": "image name or id", "inventory": "inventory file", "json": "print JSON"})
@user_errors
def rm(c, image, inventory=None, json=False):
    """Remove an image from every host and the store; refused while a VM uses it."""
    from cloudops import fleet
    from cloudops.compute import vms
    from cloudops.imaging import store as images
    from cloudops.tasks._cli import finish, load_inventory

    hosts = load_inventory(c, inventory).hypervisors()
    listing = fleet.run(hosts, vms.list_on_host)
    if listing.failed:
        down = ", ".join(f"{r.host} ({r.error})" for r in listing.failed)
        raise CloudopsError(f"cannot check which VMs use the image, hosts unreachable: {down}")
    in_use = {}
    for r in listing:
        for vm in r.value:
            in_use.setdefault(vm.image, []).append(f"{vm.name}@{vm.host}")
    finish(images.remove_image(image, hosts, in_use), json)
