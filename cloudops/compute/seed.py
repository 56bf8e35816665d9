"""NoCloud seed ISOs (volume label ``cidata``): meta-data, user-data, network-config for a new guest.

The files are what real cloud-init accepts, and they are written one value a line
(strings as JSON-quoted YAML scalars) so the tiny image's busybox boot script can
read them too. Only a password *hash* ever goes into a seed.

The user's own user-data (``user_data``, a ``userdata.UserData``) is merged in by the rule
of ``cloudops.compute.userdata``: a cloud-config of the user's becomes part of cloudops's one
document (cloudops's keys, in the form above, first; the user's other keys after them, as
``yaml.safe_dump`` writes them); a script or a multipart makes the user-data a MIME
multipart, cloudops's cloud-config its first part (8bit, so still one value a line).
"""

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from cloudops import atomicfile, passwords
from cloudops.compute import userdata
from cloudops.compute.guestconfig import normalize_ssh_keys, validate_hostname
from cloudops.errors import CloudopsError
from cloudops.templating import render

VOLUME_ID = "cidata"


def dhcp_config(macs, first: int = 0) -> dict:
    """network-config v2 for a VM's NICs: each matched by its MAC, named eth0, eth1, ..., DHCP.

    Not a name pattern: cloud-init's ifupdown renderer (Debian's images) takes an ethernet's ID
    as the interface name, so ``all-en: {match: {name: "e*"}}`` became an interface "all-en"
    that does not exist, and networking failed to start. A MAC match with ``set-name`` renders
    the same on every renderer (ifupdown, networkd, netplan, sysconfig).
    """
    return {"version": 2, "ethernets": {f"eth{i}": {"match": {"macaddress": mac}, "set-name": f"eth{i}",
                                                    "dhcp4": True} for i, mac in enumerate(macs, first)}}


def static_config(mac: str, address: str, gateway: str | None = None, dns=(), name: str = "eth0") -> dict:
    """network-config v2 for a NIC with a fixed address (a bridged LAN without DHCP): matched by MAC, ``name``.

    Rendered one value a line, so the tiny image's boot script reads it too: the first
    ``addresses`` item, ``via`` of the default route, ``nameservers.addresses``."""
    eth = {"match": {"macaddress": mac}, "set-name": name, "dhcp4": False, "addresses": [address]}
    if gateway:
        eth["routes"] = [{"to": "default", "via": gateway}]
    if dns:
        eth["nameservers"] = {"addresses": list(dns)}
    return {"version": 2, "ethernets": {name: eth}}


def _quote(value: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is a subset of YAML)."""
    return json.dumps(value, ensure_ascii=False)


def _network_yaml(network_config) -> str:
    config = network_config
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError as exc:
            raise CloudopsError(f"network-config is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict) or not ({"version", "network"} & set(config)):
        raise CloudopsError("network-config must be a mapping with 'version: 1|2' (or a 'network:' key)")
    return yaml.safe_dump(config, default_flow_style=False, sort_keys=False).rstrip("\n")


def user_data_text(hostname, keys, password_hash=None, user_data=None, progress=lambda m: None,
                   host_key: str | None = None) -> str:
    """The seed's user-data: cloudops's cloud-config, merged with the user's ``user_data`` when given.

    ``progress`` gets one note per key of the user's that cloudops overrode (names, never values).
    ``host_key``: the guest's ed25519 SSH host key (OpenSSH private key text), for cloud-init's
    ``ssh_keys``; left out when the user's own cloud-config sets ``ssh_keys``."""
    merged = userdata.merge(user_data.config if user_data else {}, hostname, keys, password_hash)
    for note in merged.notes:
        progress(note)
    if host_key is not None and "ssh_keys" in merged.rest:
        progress("your user-data sets ssh_keys: the guest's host keys are yours, cloudops reads them on its console")
        host_key = None
    text = render(
        "seed/user-data.j2",
        hostname=_quote(hostname),
        ssh_keys=[_quote(k) for k in merged.ssh_keys],
        password_hash=_quote(password_hash) if password_hash else None,
        user_users=None if merged.users is None else [userdata.dump([u], indent=2) for u in merged.users],
        chpasswd_users=[userdata.dump([u], indent=4) for u in merged.chpasswd_users],
        user_rest=userdata.dump(merged.rest) if merged.rest else "",
        host_key=None if host_key is None else _host_key_block(host_key),
    )
    if user_data and user_data.parts:
        return userdata.multipart(text, user_data.parts)
    return text


def _host_key_block(private: str) -> dict:
    """The private key's lines and its public half, checked: what the template writes under ``ssh_keys``."""
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_private_key(private.encode(), password=None)
    except ValueError:
        raise CloudopsError("the VM's host key is not an OpenSSH private key") from None
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if not public.startswith(b"ssh-ed25519 "):
        raise CloudopsError("the VM's host key must be an ed25519 key")
    return {"private_lines": private.strip().splitlines(), "public": _quote(public.decode())}


def seed_files(hostname, ssh_keys=(), password_hash=None, network_config=None, instance_id=None, *,
               user_data=None, progress=lambda m: None, host_key: str | None = None) -> dict:
    """The seed files as {name: text} (network-config only when given); validates every value first."""
    validate_hostname(hostname)
    keys = normalize_ssh_keys(ssh_keys)
    if password_hash is not None and not passwords.is_hash(password_hash):
        raise CloudopsError("password_hash is not a crypt hash ($6$...); hash it with passwords.hash_password")
    network_yaml = None if network_config is None else _network_yaml(network_config)
    user_text = user_data_text(hostname, keys, password_hash, user_data, progress, host_key=host_key)
    if instance_id is None:
        digest = hashlib.sha256(json.dumps([hostname, user_text, network_yaml]).encode()).hexdigest()[:12]
        instance_id = f"iid-{hostname}-{digest}"
    elif not isinstance(instance_id, str) or not instance_id.replace("-", "").replace(".", "").isalnum():
        raise CloudopsError(f"bad instance-id {instance_id!r}: use letters, digits, '-' and '.'")
    files = {"meta-data": render("seed/meta-data.j2", instance_id=instance_id, hostname=hostname),
             "user-data": user_text}
    if network_yaml is not None:  # none given: no file, and cloud-init's fallback (DHCP on the first NIC)
        files["network-config"] = render("seed/network-config.j2", network_yaml=network_yaml)
    return files


def make_seed(path, hostname, ssh_keys=(), password_hash=None, network_config=None, *, instance_id=None,
              user_data=None, progress=lambda m: None, host_key: str | None = None) -> Path:
    """Write a NoCloud seed ISO at ``path`` (mode 0600, replaced atomically) and return its path."""
    path = Path(path).resolve()
    files = seed_files(hostname, ssh_keys, password_hash, network_config, instance_id, user_data=user_data,
                       progress=progress, host_key=host_key)
    if shutil.which("genisoimage") is None:
        raise CloudopsError("genisoimage is not installed (apt-get install genisoimage)")
    if not path.parent.is_dir():
        raise CloudopsError(f"directory {path.parent} does not exist")
    # Stage next to the target (mkdtemp makes it 0700) so the final rename is atomic.
    stage = Path(tempfile.mkdtemp(prefix=".seed-", dir=path.parent))
    try:
        content = stage / "content"
        content.mkdir()
        for name, text in files.items():
            passwords.write_private(content / name, text)  # user-data may hold a hash: 0600 from creation
        iso = stage / "seed.iso"
        cmd = ["genisoimage", "-quiet", "-output", str(iso), "-volid", VOLUME_ID, "-joliet", "-rock",
               *files]  # fmt: skip
        proc = subprocess.run(cmd, cwd=content, capture_output=True, text=True, umask=0o077)  # the ISO: 0600
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise CloudopsError(f"genisoimage failed: {last}")
        atomicfile.replace(iso, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return path


SEED_DIR = "/var/lib/cloud/seed/nocloud"  # where cloud-init's NoCloud datasource also looks, inside the guest


def files_in_guest(hostname, ssh_keys=(), network_config=None, instance_id=None) -> dict[str, str]:
    """The seed as files for the guest's own disk (``--customize guestfs``: no seed ISO is attached).

    No password hash: libguestfs has already put it in /etc/shadow, and these files are
    world-readable in the guest. cloud-init brings the network up from them (by MAC)."""
    files = seed_files(hostname, ssh_keys, None, network_config, instance_id)
    return {f"{SEED_DIR}/{name}": text for name, text in files.items()}
