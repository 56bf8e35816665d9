"""Import a VM from an export (``cloudops.compute.export``): check it, then start a new VM on its disk.

``vm.import FILE --name N`` reads ``FILE.json``, refuses an export whose size or sha256 differs from
what it says (truncated or altered) and a file that is not a standalone qcow2, all before anything is
made; then ``vms.start_vm`` does the rest as for any VM (name lock, scheduler or ``--host``, IPAM
addresses and reservations, a NoCloud seed with the new name, MAC and address, the domain, the wait
for SSH, and its undo on failure), with ``VMSpec.disk_file`` so that the uploaded export is the VM's
disk instead of an overlay on an image. The guest keeps its disk: files, keys, passwords. Its SSH host
key was made at its first boot; cloudops learns it again from the console as at every start.

The image: an image that boots through its own bootloader is not needed (the disk holds everything);
a direct-boot image (the tiny recipe's) gives the VM its kernel and initrd, so it must be in this
cloud's catalog (the same id); otherwise the import is refused, naming it.
"""

import hashlib
import json
import os
import subprocess
from pathlib import Path

from cloudops.compute import export, vms
from cloudops.errors import CloudopsError
from cloudops.imaging import store as images

REQUIRED = ("disk", "image", "memory", "vcpus")


def read_description(path) -> dict:
    """The description beside the export ``path``, checked for the fields an import uses."""
    path = Path(path)
    desc_path = export.description_path(path)
    if not path.is_file():
        raise CloudopsError(f"{path}: no such file")
    try:
        data = json.loads(desc_path.read_text())
    except FileNotFoundError:
        raise CloudopsError(f"{desc_path} is missing: an export is FILE and its description FILE.json") from None
    except (OSError, ValueError) as exc:
        raise CloudopsError(f"{desc_path} is not a cloudops export description: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != export.FORMAT:
        raise CloudopsError(f"{desc_path} is not a cloudops export description (no \"format\": \"{export.FORMAT}\")")
    if data.get("version") != export.VERSION:
        raise CloudopsError(f"{desc_path}: export version {data.get('version')!r}, this cloudops reads {export.VERSION}")
    missing = [k for k in REQUIRED if k not in data]
    disk = data.get("disk") if isinstance(data.get("disk"), dict) else {}
    missing += [f"disk.{k}" for k in ("size", "sha256", "virtual_size") if k not in disk]
    if missing:
        raise CloudopsError(f"{desc_path} lacks {', '.join(missing)}")
    return data


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(export.CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path, data: dict) -> None:
    """Refuse an export that is not what its description says, in one line."""
    path = Path(path)
    disk = data["disk"]
    size = path.stat().st_size
    if size != disk["size"]:
        raise CloudopsError(f"{path} is {size} bytes, {path.name}.json says {disk['size']}: a truncated or altered "
                            "export, not importing it")
    actual = sha256_of(path)
    if actual != disk["sha256"]:
        raise CloudopsError(f"{path}: sha256 is {actual[:12]}..., {path.name}.json says {str(disk['sha256'])[:12]}...: "
                            "an altered export, not importing it")
    result = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise CloudopsError(f"{path}: qemu-img info failed: {export._first_line(result.stderr)}")
    info = export.parse_qemu_img_info(result.stdout)
    if info["format"] != "qcow2" or info["backing"]:
        raise CloudopsError(f"{path} is not a standalone qcow2 (format {info['format']}, backing {info['backing']})")


def image_for(data: dict):
    """The Image a VM from this export boots with: the catalog's, else a stand-in when none is needed."""
    wanted = data["image"] or {}
    image_id = wanted.get("id")
    known = next((i for i in images.list_images() if image_id and i.id == image_id), None)
    if known is not None:
        return known
    if wanted.get("boot"):
        raise CloudopsError(f"the export boots the kernel of image {wanted.get('name') or '?'} ({str(image_id)[:12]}) "
                            "directly, and this cloud's catalog does not have that image: image.add it first")
    disk = data["disk"]
    return images.Image(id=image_id or "imported", name=wanted.get("name") or "imported", format="qcow2",
                        virtual_size=disk["virtual_size"], size=disk["size"], added=0, boot=None)


def import_vm(path, name: str, inventory, host: str | None = None, network=None, timeout: float = 180,
              wait: bool = True, progress=lambda m: None) -> vms.VM:
    """Start the VM ``name`` from the export ``path`` (checked first); returns it once SSH answers."""
    vms.validate_name(name)
    path = Path(path)
    data = read_description(path)
    progress(f"checking {path} against {path.name}.json (size and sha256)")
    verify(path, data)
    image = image_for(data)
    spec = spec_for(data, name, path, image, host=host, network=network, timeout=timeout, wait=wait)
    return vms.start_vm(spec, inventory, progress=progress, image=image)


def spec_for(data: dict, name: str, path, image, host=None, network=None, timeout: float = 180,
             wait: bool = True) -> vms.VMSpec:
    """The VMSpec of a VM on the exported disk ``path``: the export's size, firmware and (default) networks."""
    networks = network if network else [n for n in data.get("networks") or [] if n] or None
    return vms.VMSpec(name=name, image=image.id, memory=int(data["memory"]), vcpus=int(data["vcpus"]), host=host,
                      network=networks, firmware=data.get("firmware") or "bios", timeout=timeout, wait=wait,
                      disk_size=int(data["disk"]["virtual_size"]), disk_file=os.fspath(path))
