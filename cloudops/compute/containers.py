"""Containers: OS-level guests run by libvirt's LXC driver beside the VMs, with the same names, networks,
IPAM addresses, hostname, root keys and password.

A container runs the image's ``/sbin/init`` on its host's kernel, on an overlay root (``rootfs``): the
image's tree unpacked once per host, the container's own changes in its upper directory. Its seed (the
NoCloud files a VM finds on its CD-ROM) is written into that directory before the first start, with the SSH
host key cloudops made, so SSH answering with that key is the proof of readiness (a container has no serial
console log). Its metadata is a VM's with ``kind`` "container": listings, IPAM, ``state.check`` and
placement read both alike.

What differs from a VM, and why:

- a stop is the power-off signal of the image's init sent to the container's pid 1 (there is no ACPI:
  ``rootfs.STOP_SIGNALS``), destroyed after the timeout; a reboot inside the guest restarts it;
- migration is cold (``migrate_container``): stopped, its upper directory copied through this machine,
  started on the destination with the same address; libvirt cannot move a running container;
- no snapshots, disks, resize, console log, HA failover record or UEFI: those verbs refuse a container
  with one line (``vms.locate``).
"""

import contextlib
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import libvirt

from cloudops import passwords, virt
from cloudops.compute import guest, placement, power, rootfs, seed, vms
from cloudops.errors import CloudopsError
from cloudops.imaging import store as images
from cloudops.net import ipam, networks, probe
from cloudops.ssh import connect
from cloudops.templating import render

DROPBEAR_KEY = "/etc/dropbear/dropbear_ed25519_host_key"


def check_spec(spec: vms.VMSpec) -> None:
    """What a VM has and a container cannot, refused with one line before anything is asked or made."""
    refused = [(spec.customize != "seed", "--customize guestfs (a container's seed is files in its tree)"),
               (spec.disk_size is not None, "--disk-size (a container has no disk: its files live in the host's pool)"),
               (spec.firmware != "bios", "--firmware (a container runs on its host's kernel)"),
               (spec.max_memory is not None or spec.max_vcpus is not None, "--max-memory and --max-vcpus"),
               (spec.storage != "local", "--storage shared (a container's tree is on its host)"),
               (spec.disk_file is not None, "an existing disk")]
    for wrong, what in refused:
        if wrong:
            raise CloudopsError(f"{what} does not apply to a container")


def connection(host):
    """``host``'s LXC connection; one line when its libvirtd has no LXC driver."""
    conn = virt.container_connection(host)
    if conn is None:
        raise CloudopsError(f"{host.name} runs no containers: its libvirtd has no LXC driver "
                            "(libvirt-daemon-driver-lxc; `fab deploy` installs it)")
    return conn


# ---------------------------------------------------------------- start

def start_container(spec: vms.VMSpec, inventory, progress=lambda m: None, extra_networks=()) -> vms.VM:
    """Start a container from an image; returns it with its host and IP once SSH answers with its host key.

    The same steps as ``vms.start_vm`` where they apply (name lock, name free in the cloud, placement,
    IPAM, DHCP reservation or ARP probe on a bridged LAN), each with its undo: a failed start leaves no
    definition, tree, reservation or address behind."""
    vms.validate(spec)
    check_spec(spec)
    image = images.resolve(spec.image)
    if spec.host and spec.host not in inventory.hosts:
        raise CloudopsError(f"unknown host {spec.host!r} (inventory {inventory.path}; known: {', '.join(inventory.hosts)})")
    candidates = [inventory.hosts[spec.host]] if spec.host else inventory.hypervisors()
    nets = vms.start_networks(spec, candidates, inventory, extra_networks)
    if spec.ip is not None:
        ipam.peek(nets[0], spec.name, ip=spec.ip)
    tar = rootfs.root_tar(image, progress)  # refused here when the image cannot be a container; once per image
    password_hash = passwords.hash_password(spec.root_password) if spec.root_password else None
    keys = (*spec.ssh_keys, *guest.trusted_public_keys())
    t0 = time.monotonic()
    with vms._name_lock(spec.name):
        progress(f"checking that the name {spec.name} is free on {len(inventory.hypervisors())} hosts")
        vms._ensure_name_free(spec.name, inventory.hypervisors())
        progress("placing the container")
        host = placement.choose(spec, candidates)
        progress(f"building container {spec.name} on {host.name}")
        undo = vms._Undo()
        try:
            ct = _build(spec, image, tar, host, nets, password_hash, keys, undo, progress)
        except BaseException:
            progress("start failed; removing what was made")
            for leftover in undo.run():
                progress(f"could not undo {leftover}")
            raise
    ct.timings = {"total": round(time.monotonic() - t0, 3)}
    return ct


def _build(spec, image, tar, host, nets, password_hash, keys, undo, progress) -> vms.VM:
    with connect(host) as hv, virt.open_host(host) as qemu:
        conn = connection(host)
        rootfs.ensure_base(image, host, hv, tar, progress)
        for net in nets:
            networks.ensure_network(qemu, net)  # one libvirtd: its networks serve both drivers
        allocations = _allocate(spec, host, hv, qemu, nets, undo, progress)
        hostname = spec.hostname or spec.name
        private, host_key = guest.make_host_key()
        files = seed.seed_files(hostname, keys, password_hash, vms.nics_network_config(list(zip(nets, allocations))),
                                instance_id=f"{spec.name}-{secrets.token_hex(4)}", user_data=spec.user_data,
                                progress=progress, host_key=private)
        rootfs.make_tree(hv, host, spec.name)
        undo.push(rootfs.remove_tree, hv, host, spec.name)
        rootfs.write_files(hv, host, spec.name, {
            **{f"{seed.SEED_DIR}/{n}": (text.encode(), 0o600) for n, text in files.items()},  # a hash: root's only
            DROPBEAR_KEY: (rootfs.dropbear_key(private), 0o600)})
        rootfs.mount(hv, host, spec.name, image.id)
        xml = render("libvirt/container.xml.j2", metadata_ns=virt.METADATA_NS, ct=domain_vars(
            spec.name, str(uuid.uuid4()), spec.memory, spec.vcpus, image, nets, allocations, spec.group,
            rootfs.root_dir(host, spec.name)))
        dom = conn.defineXML(xml)
        undo.push(vms._undefine, dom)
        dom.create()
        undo.push(vms._destroy, dom)
        progress(f"container {spec.name} started on {host.name}")
        if spec.wait:
            wait_ready(dom, qemu, hv, nets[0], allocations[0], spec.name, spec.timeout, host_key, progress)
        return vms.describe(dom, host.name)


def _allocate(spec, host, hv, qemu, nets, undo, progress) -> list:
    allocations = []
    for i, net in enumerate(nets):
        allocation = ipam.allocate(net, spec.name, ip=spec.ip if i == 0 else None)
        undo.push(ipam.release, net, spec.name)
        if net.mode == "bridge":
            progress(f"probing {allocation.ip} on {net.name} (ARP, from {host.name})")
            probe.ensure_free(hv, host.name, net, allocation.ip, requested=spec.ip is not None and i == 0)
        networks.add_reservation(qemu, net.name, allocation.mac, allocation.ip, spec.name)
        undo.push(networks.remove_reservation, qemu, net.name, allocation.mac, allocation.ip, spec.name)
        allocations.append(allocation)
    return allocations


def domain_vars(name, dom_uuid, memory, vcpus, image, nets, allocations, group, root_dir) -> dict:
    return dict(name=name, uuid=dom_uuid, memory=memory, vcpus=vcpus, image_id=image.id,
                stop_signal=rootfs.facts(image)["stop_signal"], network=nets[0].name,
                ip=allocations[0].ip, mac=allocations[0].mac, group=group, created=int(time.time()),
                extra_nics=[{"network": n.name, "ip": a.ip, "mac": a.mac} for n, a in zip(nets[1:], allocations[1:])],
                root_dir=root_dir)


def wait_ready(dom, qemu, hv, net, allocation, name, timeout, host_key, progress=lambda m: None) -> str:
    """Wait for the container's address (its DHCP lease; on a bridged LAN it sets it itself), then for SSH
    there proving it holds ``host_key`` (type, base64); the key is recorded for ``vm.ssh``."""
    deadline = time.monotonic() + timeout

    def alive(value):
        if not value and not vms._running(dom):
            raise CloudopsError(f"container {name} stopped while booting (its init exited)")
        return value

    def remaining():
        return max(5.0, deadline - time.monotonic())

    ip = allocation.ip
    if net.mode != "bridge":
        progress(f"waiting for an IP address for {name} ({allocation.ip})")
        ip = guest.wait_until(lambda: alive(vms._address(dom, qemu, net.name, allocation.mac)), remaining(),
                              f"an IP address for {name}")
        if ip != allocation.ip:
            raise CloudopsError(f"{name} got {ip}, not its reserved address {allocation.ip}")
    progress(f"waiting for SSH on {name} ({ip}) with the host key cloudops made")
    with guest.quiet_tunnels():
        guest.wait_until(lambda: alive(guest.ssh_banner(hv, ip) and guest.presents_host_key(hv, ip, host_key)),
                         remaining(), f"SSH with its host key on {name} ({ip})", interval=0.5)
    guest.record_host_keys(name, ip, [tuple(host_key)])
    return ip


# ---------------------------------------------------------------- find one

@contextlib.contextmanager
def _own(name: str, hosts: list, doing: str):
    """(host, LXC connection, domain) of the cloudops container ``name``, under its name lock."""
    vms.validate_name(name)
    with vms._name_lock(name):
        host, kind = vms.locate_guest(name, hosts)
        if kind != "container":
            raise CloudopsError(f"{name!r} is a VM on {host.name}, not a container")
        conn = connection(host)
        dom = conn.lookupByName(name)
        if not vms.made_by_cloudops(dom):
            raise CloudopsError(f"container {name!r} on {host.name} was not made by cloudops (no cloudops metadata):"
                                f" refusing to {doing}")
        yield host, conn, dom


def host_key_of(name: str) -> tuple[str, str] | None:
    """The host key recorded when the container first answered (its key file stays in its tree)."""
    from cloudops import state

    entry = state.current().value(guest.HOSTKEYS + name) or {}
    keys = entry.get("keys") or []
    return tuple(keys[0]) if keys else None


# ---------------------------------------------------------------- stop, power on, delete

def stop_container(name: str, hosts: list, timeout: float = 60, force: bool = False,
                   progress=lambda m: None) -> power.PowerResult:
    """SIGTERM to the container's init, destroyed after ``timeout`` (``force``: at once); its overlay unmounted.
    A stopped container changes nothing."""
    with _own(name, hosts, "stop it") as (host, _conn, dom):
        with connect(host) as hv:
            if not dom.isActive():
                rootfs.umount(hv, host, name)  # one that stopped by itself leaves its overlay mounted
                return power.PowerResult(vms.describe(dom, host.name, "container"), False, "none",
                                         f"{name} on {host.name}: already stopped, nothing to do")
            action = _halt(dom, name, host, timeout, force, progress)
            rootfs.umount(hv, host, name)
        how = "stopped at once (--force)" if action == "destroyed" else "stopped"
        return power.PowerResult(vms.describe(dom, host.name, "container"), True, action,
                                 f"{name} on {host.name}: {how}")


def _halt(dom, name, host, timeout, force, progress) -> str:
    if not force:
        signal = virt.metadata(dom).get("stop_signal") or rootfs.DEFAULT_STOP_SIGNAL
        progress(f"stopping container {name} on {host.name} (SIG{signal.upper()} to its init)")
        with contextlib.suppress(libvirt.libvirtError):
            dom.sendProcessSignal(1, getattr(libvirt, f"VIR_DOMAIN_PROCESS_SIGNAL_{signal.upper()}"), 0)
        deadline = time.monotonic() + timeout
        while vms._running(dom) and time.monotonic() < deadline:
            time.sleep(0.3)
        if not vms._running(dom):
            return "stopped"
        progress(f"{name} did not stop within {timeout:g}s; destroying it")
    vms._destroy(dom)
    return "destroyed"


def poweron_container(name: str, inventory, hosts: list | None = None, wait: bool = True, timeout: float = 180,
                      progress=lambda m: None, extra_networks=()) -> power.PowerResult:
    """Start a stopped container again on its host, with its address: a fresh overlay, its network and
    reservation made sure of, then SSH with its recorded host key. A running one changes nothing."""
    hosts = hosts or inventory.hypervisors()
    with _own(name, hosts, "power it on") as (host, _conn, dom):
        ct = vms.describe(dom, host.name, "container")
        if dom.isActive():
            return power.PowerResult(ct, False, "none", f"{name} on {host.name}: already running, nothing to do")
        nics = power._allocations(ct, host, extra_networks)
        with connect(host) as hv, virt.open_host(host) as qemu:
            power.ensure_nics(qemu, name, nics, progress)
            rootfs.mount(hv, host, name, ct.image)
            progress(f"starting container {name} on {host.name}")
            dom.create()
            net, allocation = nics[0]
            key = host_key_of(name)
            if not wait or key is None:
                note = "not waiting for SSH" if not wait else "no recorded host key to wait for"
                return power.PowerResult(vms.describe(dom, host.name, "container"), True, "powered on",
                                         f"{name} on {host.name}: powered on at {allocation.ip} ({note})")
            try:
                wait_ready(dom, qemu, hv, net, allocation, name, timeout, key, progress)
            except CloudopsError as exc:
                raise CloudopsError(f"{name} was powered on on {host.name} but is not ready: {exc}") from None
        return power.PowerResult(vms.describe(dom, host.name, "container"), True, "powered on",
                                 f"{name} on {host.name}: powered on, SSH answers at {allocation.ip}")


def delete_container(name: str, inventory, hosts: list | None = None, progress=lambda m: None, extra_networks=(),
                     force: bool = False) -> vms.VM:
    """Destroy and undefine a container cloudops made; remove its tree (overlay unmounted), reservation,
    address and recorded host key. One cloudops did not make is refused; ``force`` undefines it and
    leaves its files alone."""
    hosts = hosts or inventory.hypervisors()
    vms.validate_name(name)
    with vms._name_lock(name):
        host, _kind = vms.locate_guest(name, hosts)
        conn = connection(host)
        dom = conn.lookupByName(name)
        ours = vms.made_by_cloudops(dom)
        if not ours and not force:
            raise CloudopsError(f"container {name!r} on {host.name} was not made by cloudops (no cloudops metadata): "
                                "refusing to delete it; --force undefines it and still leaves its files alone")
        ct = vms.describe(dom, host.name, "container")
        vms._destroy(dom)
        vms._undefine(dom)
        if not ours:
            progress(f"undefined container {name} on {host.name} (--force; its files are left alone)")
            return ct
        progress(f"undefined container {name} on {host.name}; removing its tree and address")
        with connect(host) as hv, virt.open_host(host) as qemu:
            rootfs.remove_tree(hv, host, name)
            _release(qemu, host, ct, extra_networks, release_ipam=True)
        guest.forget_host_keys(name, ct.ip)
    return ct


def _release(qemu, host, ct, extra_networks, release_ipam: bool) -> None:
    for nic in ct.nics:
        if not (nic["mac"] and nic["ip"]):
            continue
        with contextlib.suppress(CloudopsError, libvirt.libvirtError):
            networks.remove_reservation(qemu, nic["network"], nic["mac"], nic["ip"], ct.name)
        if release_ipam:
            ipam.release(vms.network_spec(nic["network"], host, extra_networks), ct.name)


# ---------------------------------------------------------------- cold migration

@dataclass
class ColdMove:
    name: str
    source: str
    destination: str
    ip: str | None
    bytes_copied: int
    duration: float
    running: bool  # whether it runs on the destination (it is started there only if it ran before)

    def to_dict(self) -> dict:
        return {**self.__dict__, "kind": "container", "cold": True}

    def summary(self) -> str:
        ran = f"started there, SSH answers at {self.ip}" if self.running else "left stopped, as it was"
        return (f"{self.name}: moved cold from {self.source} to {self.destination} in {self.duration:.1f} s "
                f"(stopped, {self.bytes_copied >> 10} KiB of its own files copied, {ran})")


LIVE_REFUSED = ("{name} is a container: containers do not migrate live; `vm.migrate {name} --to {to} --cold` stops "
                "it, copies it and starts it on {to} with the same address")


def migrate_container(name: str, to: str, inventory, timeout: float = 180, progress=lambda m: None,
                      extra_networks=()) -> ColdMove:
    """Move a container to host ``to`` cold: stop it, copy its own files (its upper directory, through this
    machine), make it on ``to`` with the same definition and address, start it there if it ran, then remove
    it from its source. Until the destination's copy runs, the source's is left whole; a failure there
    removes what was made on the destination and starts the container again on its source."""
    if to not in inventory.hosts:
        raise CloudopsError(f"unknown host {to!r} (inventory {inventory.path}; known: {', '.join(inventory.hosts)})")
    dest = inventory.hosts[to]
    t0 = time.monotonic()
    with _own(name, inventory.hypervisors(), "migrate it") as (source, _conn, dom):
        if source.name == dest.name:
            raise CloudopsError(f"container {name} is already on {to}")
        dest_conn = connection(dest)
        ct = vms.describe(dom, source.name, "container")
        nics = power._allocations(ct, source, extra_networks)
        image = images.resolve(ct.image)
        tar = rootfs.root_tar(image, progress)
        was_running = vms._running(dom)
        key = host_key_of(name)
        with connect(source) as src:
            if was_running:
                _halt(dom, name, source, 60, False, progress)
            rootfs.umount(src, source, name)
            undo = vms._Undo()
            try:
                with rootfs.scratch_dir() as tmp, connect(dest) as dst, virt.open_host(dest) as qemu:
                    local = Path(tmp) / "upper.tar"
                    progress(f"copying container {name}'s own files from {source.name} to {dest.name}")
                    copied = rootfs.pack_upper(src, source, name, local)
                    rootfs.ensure_base(image, dest, dst, tar, progress)
                    rootfs.make_tree(dst, dest, name)
                    undo.push(rootfs.remove_tree, dst, dest, name)
                    rootfs.unpack_upper(dst, dest, name, local)
                    for net, allocation in nics:
                        networks.ensure_network(qemu, net)
                        if networks.add_reservation(qemu, net.name, allocation.mac, allocation.ip, name)[0]:
                            undo.push(networks.remove_reservation, qemu, net.name, allocation.mac, allocation.ip, name)
                    rootfs.mount(dst, dest, name, image.id)
                    nets, allocations = [n for n, _ in nics], [a for _, a in nics]
                    xml = render("libvirt/container.xml.j2", metadata_ns=virt.METADATA_NS, ct=domain_vars(
                        name, dom.UUIDString(), ct.memory, ct.vcpus, image, nets, allocations, ct.group,
                        rootfs.root_dir(dest, name)))
                    moved = dest_conn.defineXML(xml)
                    undo.push(vms._undefine, moved)
                    if was_running:
                        moved.create()
                        undo.push(vms._destroy, moved)
                        progress(f"container {name} started on {dest.name}")
                        if key is not None:
                            wait_ready(moved, qemu, dst, nets[0], allocations[0], name, timeout, key, progress)
            except BaseException:
                progress(f"the move failed; removing what was made on {dest.name} and keeping {name} on "
                         f"{source.name}")
                for leftover in undo.run():
                    progress(f"could not undo {leftover}")
                if was_running:
                    with contextlib.suppress(CloudopsError, libvirt.libvirtError):
                        rootfs.mount(src, source, name, image.id)
                        dom.create()
                raise
            vms._undefine(dom)
            with virt.open_host(source) as src_qemu:
                _release(src_qemu, source, ct, extra_networks, release_ipam=False)  # the address stays its own
            rootfs.remove_tree(src, source, name)
    return ColdMove(name, source.name, dest.name, ct.ip, copied, round(time.monotonic() - t0, 2), was_running)
