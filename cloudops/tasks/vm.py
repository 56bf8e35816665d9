"""Virtual machines: start, stop, delete, list, inspect and reach them."""

import contextlib
import sys
import time

from invoke import Exit, task

from cloudops import fleet, output, passwords
from cloudops.compute import guest, power, vms
from cloudops.errors import CloudopsError, NotFound
from cloudops.inventory import hypervisors
from cloudops.tasks._cli import SELECT_HELP, emit_json, load_inventory, progress, select_hosts, user_errors


def _password(password, password_file, password_stdin):
    """The root password from a file, stdin or $CLOUDOPS_ROOT_PASSWORD; --password is refused (visible in ps)."""
    return passwords.read_root_password(password_file, password_stdin, password)


def _keys(ssh_key):
    if not ssh_key:
        return ()
    from cloudops.compute.guestconfig import read_ssh_key_files

    return tuple(read_ssh_key_files([p for p in ssh_key.split(",") if p]))


@task(help={
    "name": "VM name (a-z 0-9 -, up to 40)", "image": "image name or id (see image.list)",
    "memory": "MiB (default: config vm.memory)", "vcpus": "vCPUs (default: config vm.vcpus)",
    "host": "put it on this host (default: the scheduler chooses)", "network": "network name (default: cloudops); several, comma-separated, give a NIC on each (eth0, eth1, ...; "
               "the first is the primary: its address is the VM's, --ip applies to it)",
    "password": "refused (a password on the command line is visible in ps): use the next two",
    "password_file": "read the root password from a file (first line; else $CLOUDOPS_ROOT_PASSWORD)",
    "password_stdin": "read the root password from stdin", "ssh_key": "public key file(s) for root, comma-separated",
    "hostname": "guest hostname (default: the VM name)", "customize": "seed (NoCloud CD-ROM) or guestfs",
    "group": "anti-affinity group: never two VMs of a group on one host", "no_wait": "do not wait for SSH",
    "timeout": "seconds to wait for the IP and SSH", "inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"],
    "disk_size": "root disk size, e.g. 4G (K/M/G/T, binary; at least the image's virtual size; default: the image's)",
    "flavor": "a named size (flavors: in the inventory's vars or config vm.flavors); explicit options override it",
    "dry_run": "print the host the scheduler would choose and why, the address, the disk and what would be made; "
               "make nothing",
    "ip": "ask for this address on the network (refused outside its subnet, on its gateway, network or broadcast "
          "address, in its DHCP range, reserved, or allocated to another VM)",
    "user_data": "your own cloud-init user-data file (#cloud-config, a #! script, or MIME multipart), merged with "
                 "cloudops's (hostname, keys, password hash): see the README",
    "firmware": "bios (default: config vm.firmware) or uefi (OVMF; the image must boot from an EFI system partition)",
    "max_memory": "MiB the running VM can later be grown to live (vm.resize; default: its memory)",
    "max_vcpus": "vCPUs it can later be grown to live by CPU hotplug (vm.resize; default: its vCPUs)",
    "storage": "local (default: the host's pool) or shared (overlay, seed and image on the inventory's shared_path: "
               "migrations copy no disk)",
    "kind": "vm (default) or container: an OS-level guest run by libvirt's LXC driver on the host's kernel, from "
            "the same image (its tree unpacked once per host, an overlay per container): see the README"})
@user_errors
def start(c, name, image=None, memory=None, vcpus=None, host=None, network=None, password=None, password_file=None,
          password_stdin=False, ssh_key=None, hostname=None, customize=None, group=None, no_wait=False, timeout=None,
          inventory=None, json=False, disk_size=None, flavor=None, dry_run=False, user_data=None, ip=None,
          firmware=None, max_memory=None, max_vcpus=None, storage=None, kind="vm"):
    """Start a VM (or, with --kind container, a container) from an image; prints its name, host and IP once SSH
    answers."""
    vms.validate_name(name)
    vms.check_kind(kind)
    if kind == "container" and dry_run:
        raise CloudopsError("--dry-run plans VMs only: a container's start is not planned yet")
    root_password = _password(password, password_file, password_stdin)  # refused before anything is read
    inv = load_inventory(c, inventory)
    size = _size(c, inv, flavor, memory=memory, vcpus=vcpus, disk_size=disk_size)
    spec = vms.VMSpec(
        name=name, image=image or c.vm.image, memory=_int(size["memory"], "memory"),
        vcpus=_int(size["vcpus"], "vcpus"), host=host, network=network,
        root_password=root_password, ssh_keys=_keys(ssh_key),
        hostname=hostname, customize=customize or c.vm.customize, group=group, wait=not no_wait,
        timeout=float(timeout or c.vm.timeout), disk_size=size["disk_size"], user_data=user_data, ip=ip,
        firmware=firmware or c.vm.get("firmware") or "bios",
        max_memory=_int(max_memory, "max memory") if max_memory is not None else None,
        max_vcpus=_int(max_vcpus, "max vCPUs") if max_vcpus is not None else None,
        storage=storage or c.vm.get("storage") or "local")
    if kind == "container":
        spec.firmware = firmware or "bios"  # the configuration's VM firmware is no container's
    if dry_run:
        from cloudops.compute import plan

        planned = plan.plan_start(spec, inv)
        if json:
            emit_json(planned.to_dict())
        else:
            print("\n".join(planned.lines()))
        return
    if kind == "container":
        from cloudops.compute import containers

        vm = containers.start_container(spec, inv, progress=progress)
    else:
        vm = vms.start_vm(spec, inv, progress=progress)
    if json:
        emit_json(vm.to_dict())
    else:
        print(f"{vm.name} {vm.host} {vm.ip}")


def _kind(name, hosts) -> str:
    """Whether the guest ``name`` is a "vm" or a "container" (NotFound when no host has it)."""
    return vms.locate_guest(name, hosts)[1]


def _size(c, inv, flavor, **explicit):
    """memory, vcpus, disk_size: the options given, else the flavor's, else the configuration's."""
    from cloudops.compute import sizing

    chosen = None
    if flavor:
        chosen = sizing.flavor(flavor, sizing.flavors_from(c.vm.get("flavors"), sizing.inventory_flavors(inv)))
    return sizing.sized(explicit, chosen, {"memory": c.vm.memory, "vcpus": c.vm.vcpus})


def _int(value, what):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CloudopsError(f"{what} must be a whole number, got {value!r}") from None


@task(help={"name": "VM name", "timeout": "seconds to wait for ACPI shutdown before destroying",
            "force": "destroy it at once, no ACPI shutdown (only a VM cloudops made)",
            **{k: SELECT_HELP[k] for k in ("inventory", "json")}})
@user_errors
def stop(c, name, timeout=60, force=False, inventory=None, json=False):
    """Stop a VM: ACPI shutdown, destroyed after --timeout (--force: at once); says so when it was already stopped."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    hosts = _hypervisors(c, inventory)
    if _kind(name, hosts) == "container":
        from cloudops.compute import containers

        _report(containers.stop_container(name, hosts, timeout=float(timeout), force=force, progress=progress), json)
        return
    if force:
        _report(power.force_stop_vm(name, hosts, progress=progress), json)
        return
    vm, changed = vms.stop_vm(name, hosts, timeout=float(timeout), progress=progress)
    if json:
        emit_json({**vm.to_dict(), "changed": changed})
    else:
        print(f"{vm.name} on {vm.host}: {'stopped' if changed else 'already stopped, nothing to do'}")


def _report(result, json):
    """One line saying what a power verb did or that nothing changed (or its JSON, with "changed")."""
    if json:
        emit_json(result.to_dict())
    else:
        print(result.message)


@task(help={"name": "VM name", "no_wait": "do not wait for SSH",
            "timeout": "seconds to wait for the IP and SSH (default: config vm.timeout)",
            **{k: SELECT_HELP[k] for k in ("inventory", "json")}})
@user_errors
def poweron(c, name, no_wait=False, timeout=None, inventory=None, json=False):
    """Start a stopped VM again on its host, same address; waits for SSH. A running VM: says so, changes nothing.

    Idempotent, like the rest of cloudops: powering on a VM that already runs prints one line
    saying so and exits 0 (``"changed": false`` with --json). A paused VM, a domain cloudops did
    not make, or one with an unfinished migration is refused (non-zero)."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    inv = load_inventory(c, inventory)
    if _kind(name, inv.hypervisors()) == "container":
        from cloudops.compute import containers

        _report(containers.poweron_container(name, inv, wait=not no_wait, timeout=float(timeout or c.vm.timeout),
                                             progress=progress), json)
        return
    _report(power.poweron_vm(name, inv, wait=not no_wait, timeout=float(timeout or c.vm.timeout),
                             progress=progress), json)


@task(help={"name": "VM name", "force": "hard reset at once instead of an ACPI reboot",
            "timeout": "seconds the guest has to go down after the ACPI reboot before it is reset (default 60)",
            **{k: SELECT_HELP[k] for k in ("inventory", "json")}})
@user_errors
def reboot(c, name, force=False, timeout=60, inventory=None, json=False):
    """Reboot a running VM (ACPI, reset after --timeout; --force: reset) and wait until it answers again."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    _report(power.reboot_vm(name, _hypervisors(c, inventory), force=force, timeout=float(timeout),
                            wait_timeout=float(c.vm.timeout), progress=progress), json)


@task(help={"vm": "VM name", "add": "add an empty virtio disk (hot-plugged when the VM runs)",
            "size": "with --add: its size, e.g. 1G (K/M/G/T, binary)",
            "name": "the disk's name (a-z 0-9 -, up to 20; default with --add: data, data2, ...)",
            "list_": "list the VM's extra disks", "remove": "hot-unplug (or detach) this disk and delete its volume",
            "timeout": "with --remove: seconds the guest has to release the disk (default 30)",
            **{k: SELECT_HELP[k] for k in ("inventory", "json")}})
@user_errors
def disk(c, vm, add=False, size=None, name=None, list_=False, remove=None, timeout=None, inventory=None, json=False):
    """Extra disks of a VM: --add --size 1G [--name data], --list, --remove data (live on a running VM)."""
    from cloudops.compute import disks

    vms.validate_name(vm)  # one line, before the inventory is read or any host asked
    if sum(bool(x) for x in (add, list_, remove)) != 1:
        raise CloudopsError("vm.disk needs one of --add, --list or --remove NAME")
    if not add and (size is not None or name is not None):
        raise CloudopsError("--size and --name go with --add")
    hosts = _hypervisors(c, inventory)
    if add:
        result = disks.add_disk(vm, hosts, size, name=name, progress=progress)
    elif remove:
        result = disks.remove_disk(vm, hosts, remove, timeout=float(timeout or disks.DETACH_TIMEOUT),
                                   progress=progress)
    else:
        result = disks.list_disks(vm, hosts)
        if not json:
            from cloudops import output as out

            print(out.table(result.disks, ["name", "target", "size", "allocated", "attached", "path"])
                  if result.disks else result.message)
            return
    _report(result, json)


@task(help={"name": "VM name", "memory": "MiB (live up to the VM's maximum, else at the next boot)",
            "vcpus": "vCPUs (live by CPU hotplug up to the VM's maximum, else at the next boot)",
            "disk_size": "root disk size, e.g. 8G (grown live; shrinking is refused)",
            **{k: SELECT_HELP[k] for k in ("inventory", "json")}})
@user_errors
def resize(c, name, memory=None, vcpus=None, disk_size=None, inventory=None, json=False):
    """Give a VM more (or less) memory, vCPUs or root disk: live where it can, else at the next boot, and says which."""
    from cloudops.compute import resize as resizing

    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    resizing.check_request(memory, vcpus, disk_size)
    _report(resizing.resize_vm(name, _hypervisors(c, inventory), memory=memory, vcpus=vcpus, disk_size=disk_size,
                               progress=progress), json)


@task(help={"name": "VM name", **{k: SELECT_HELP[k] for k in ("inventory", "json")},
            "force": "also undefine a domain cloudops did not make (its disks are never deleted)"})
@user_errors
def delete(c, name, inventory=None, json=False, force=False):
    """Delete a VM cloudops made: destroy, undefine, remove its disks, reservation and address."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    inv = load_inventory(c, inventory)
    try:
        kind = _kind(name, inv.hypervisors())
    except NotFound:
        kind = "vm"  # vms.delete_vm says what is unknown or unreachable
    if kind == "container":
        from cloudops.compute import containers

        vm = containers.delete_container(name, inv, progress=progress, force=force)
    else:
        vm = vms.delete_vm(name, inv, progress=progress, force=force)
    if json:
        emit_json(vm.to_dict())
    else:
        print(f"deleted {vm.name} from {vm.host}")


@task(name="list", help=SELECT_HELP)
@user_errors
def list_(c, hosts=None, group=None, limit=None, inventory=None, workers=None, timeout=None, json=False):
    """List VMs on every selected host, in parallel: name, host, state, memory, vCPUs, IP."""
    selected = hypervisors(select_hosts(c, hosts, group, limit, inventory))
    result = fleet.run(selected, vms.list_on_host, workers=int(workers or c.fleet.workers),
                       timeout=float(timeout or c.fleet.timeout))
    rows = [vm.to_dict() for r in result if r.value for vm in r.value]
    if json:
        emit_json({"vms": rows, "hosts": {r.host: r.status if not r.error else r.error for r in result}})
    else:
        print(output.table(rows, ["name", "kind", "host", "state", "memory", "vcpus", "ip", "image"]) if rows
              else "no VMs")
        for r in result.failed:
            error = r.error or "failed"
            print(error if error.startswith(f"{r.host}: ") else f"{r.host}: {error}", file=sys.stderr)
    if result.failed:
        raise Exit(code=1)


@task(help={"name": "VM name", "arp": "also scan each NIC's network from the VM's host for the addresses its MAC "
                                     "answers ARP for (done anyway for a NIC whose address cloudops does not know)",
            **{k: SELECT_HELP[k] for k in ("inventory", "json")}})
@user_errors
def info(c, name, arp=False, inventory=None, json=False):
    """Everything known about one VM or container; a NIC's address cloudops does not know is found by ARP."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    host, kind = vms.locate_guest(name, _hypervisors(c, inventory))
    from cloudops import virt
    from cloudops.compute import addresses

    if kind == "container":
        from cloudops.compute import containers, rootfs

        dom = containers.connection(host).lookupByName(name)
        data = {**vms.describe(dom, host.name, kind).to_dict(), "root": rootfs.root_dir(host, name), "disks": []}
    else:
        with virt.open_host(host) as conn:
            dom = conn.lookupByName(name)
            data = {**vms.describe(dom, host.name).to_dict(), **vms.details(dom)}
    if not data["nics"]:  # a domain cloudops did not make: its NICs from its XML, addresses unknown
        data["nics"] = addresses.interfaces(dom)
    if data["state"] == "running" and (arp or any(not n["ip"] for n in data["nics"])):
        addresses.by_arp(host, data["nics"], progress)
        if not data.get("ip") and data["nics"] and data["nics"][0]["ip"]:
            data["ip"] = data["nics"][0]["ip"]
    if json:
        emit_json(data)
        return
    disks = data.pop("disks")
    nics = data.pop("nics", [])
    for key, value in data.items():
        print(f"{key:<10} {value}")
    for i, nic in enumerate(nics):
        seen = f" (answers ARP for: {', '.join(nic['seen']) or 'nothing'})" if "seen" in nic else ""
        print(f"{'nic':<10} eth{i} {nic['network']} {nic['ip']} {nic['mac']}{seen}")
    for disk in disks:
        print(f"{'disk':<10} {disk['target']} {disk['device']} {disk.get('size', '?')} "
              f"({disk.get('allocated', '?')} allocated) {disk['path']}")


@task(help={"name": "VM name", "command": "command to run (default: an interactive shell)",
            "inventory": SELECT_HELP["inventory"]})
@user_errors
def ssh(c, name, command=None, inventory=None):
    """SSH into a VM through its hypervisor (verified host keys, the cloud key)."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    result = _run_in_vm(c, name, command, inventory, pty=command is None)
    raise Exit(code=result.exited)


@task(help={"name": "VM name", "command": "command to run", "inventory": SELECT_HELP["inventory"]})
@user_errors
def run(c, name, command, inventory=None):
    """Run a command in a VM through its hypervisor; exits with the command's status."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    result = _run_in_vm(c, name, command, inventory)
    raise Exit(code=result.exited)


@task(help={"name": "VM name", "inventory": SELECT_HELP["inventory"], "log": "print the console log instead"})
@user_errors
def console(c, name, log=False, inventory=None):
    """Attach to a VM's serial console (virsh console via its hypervisor), or print its log."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    import shlex

    from cloudops.ssh import connect

    host = vms.locate(name, _hypervisors(c, inventory))
    with connect(host) as hv:
        if log or not sys.stdin.isatty():
            print(guest.read_console(hv, name), end="")
            return
        hv.run(f"virsh -c qemu:///system console {shlex.quote(name)}", pty=True, warn=True)


def _ship_migration_figures(c, result) -> dict:
    """Duration, downtime and bytes to Graphite (spooled when carbon is down: never fails the migration)."""
    from cloudops.metrics import cycle as metrics

    return metrics.record_migration(result.name, result.duration, result.downtime_ms or 0, result.bytes_moved or 0,
                                    carbon=c.metrics.carbon, prefix=c.metrics.prefix)


def _run_in_vm(c, name, command, inventory, pty=False):
    from cloudops.ssh import connect

    host, _kind_ = vms.locate_guest(name, _hypervisors(c, inventory))  # a VM or a container alike
    vm = next(v for v in vms.list_on_host(host) if v.name == name)
    if not vm.ip:
        raise CloudopsError(f"VM {name} has no known address")
    with connect(host) as hv, guest.connect_vm(hv, vm.ip) as conn:
        if command is None:
            return conn.run("sh -l", pty=True, warn=True)
        return conn.run(command, warn=True, in_stream=False)


def _hypervisors(c, inventory):
    return load_inventory(c, inventory).hypervisors()


@task(help={
    "name": "VM name", "to": "destination host", "timeout": "abort after this many seconds (the VM stays on its host)",
    "recover": "after a broken migration: resume it, or clean the host where the VM does not run",
    "restart": "with --recover: start a VM stranded by a broken post-copy again from its disk",
    "copy_storage": "copy disks not on shared storage (--no-copy-storage refuses)",
    "postcopy_after": "switch to post-copy at this memory iteration at the latest, earlier when pre-copy stalls "
                      "(0: never; default 4)",
    "auto_converge": "let QEMU throttle a guest that dirties memory faster than it is sent",
    "max_downtime": "highest max-downtime (ms) the ramp reaches (default 300)",
    "bandwidth": "MiB/s cap (default: unlimited)",
    "cold": "a container: stop it, copy it and start it on --to with the same address (containers do not "
            "migrate live)",
    "inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"]})
@user_errors
def migrate(c, name, to=None, timeout=None, copy_storage=True, postcopy_after=None, auto_converge=True,
            max_downtime=None, bandwidth=None, recover=False, restart=False, inventory=None, json=False, cold=False):
    """Live-migrate a VM to another host (offline when it is stopped); prints duration, downtime, bytes moved.
    A container moves cold (--cold)."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    from cloudops.migration import migrate as migration

    if cold or not recover:
        inv = load_inventory(c, inventory)
        kind = None
        with contextlib.suppress(NotFound):  # an unknown name: the migration says so, as before
            kind = _kind(name, inv.hypervisors())
        if kind == "container":
            from cloudops.compute import containers

            if not to:
                raise CloudopsError(f"vm.migrate of container {name} needs --to HOST")
            if not cold:
                raise CloudopsError(containers.LIVE_REFUSED.format(name=name, to=to))
            moved = containers.migrate_container(name, to, inv, timeout=float(timeout or c.vm.timeout),
                                                 progress=progress)
            if json:
                emit_json(moved.to_dict())
            else:
                print(moved.summary())
            return
        if cold:
            raise CloudopsError("--cold is for containers: a VM migrates live (offline when it is stopped)")

    if recover:
        from cloudops.migration.recover import recover_vm

        report = recover_vm(name, load_inventory(c, inventory), timeout=float(timeout or 300), restart=restart,
                            message=progress)
        if json:
            emit_json(report.to_dict())
        else:
            print(report.summary())
        return
    if not to:
        raise CloudopsError("vm.migrate needs --to HOST (or --recover after a broken migration)")

    policy = migration.policy_from(c.config.get("migrate") or {}, timeout=timeout, postcopy_after=postcopy_after,
                                   auto_converge=None if auto_converge else False, downtime_max_ms=max_downtime,
                                   bandwidth_mib=bandwidth)
    result = migration.migrate_vm(name, to, load_inventory(c, inventory), copy_storage=copy_storage,
                                  policy=policy, message=progress)
    shipped = _ship_migration_figures(c, result)
    if json:
        emit_json({**result.to_dict(), "metrics": shipped})
    else:
        print(result.summary())


@task(help={"name": "VM name", "create": "take a snapshot of this name", "memory": "with --create: also save the "
            "running guest's memory (revert brings back its processes)", "list": "list the VM's snapshots",
            "revert": "revert the VM to this snapshot", "delete": "delete this snapshot (the others stay usable)",
            **{k: SELECT_HELP[k] for k in ("inventory", "json")}})
@user_errors
def snapshot(c, name, create=None, memory=False, list=False, revert=None, delete=None, inventory=None, json=False):
    """Snapshots of a VM: --create SNAP [--memory], --list, --revert SNAP, --delete SNAP (internal qcow2)."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    from cloudops.compute import snapshots

    chosen = [flag for flag, value in (("--create", create), ("--list", list), ("--revert", revert),
                                       ("--delete", delete)) if value]
    if len(chosen) != 1:
        raise CloudopsError("vm.snapshot needs exactly one of --create SNAP, --list, --revert SNAP, --delete SNAP"
                            + (f" (got {' '.join(chosen)})" if chosen else ""))
    if memory and not create:
        raise CloudopsError("--memory goes with --create")
    for value in (create, revert, delete):
        if value:
            snapshots.validate_snapshot_name(value)
    hosts = _hypervisors(c, inventory)
    if list:
        result = snapshots.list_snapshots(name, hosts)
        if json:
            emit_json(result.to_dict())
            return
        rows = [{**s.to_dict(), "memory": "yes" if s.memory else "no", "current": "*" if s.current else "",
                 "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.created)),
                 "parent": s.parent or ""} for s in result.snapshots]
        print(output.table(rows, ["name", "created", "state", "memory", "consistency", "parent", "current"])
              if rows else f"{name} on {result.vm.host}: no snapshots")
        return
    if create:
        result = snapshots.create_snapshot(name, create, hosts, memory=memory, progress=progress)
    elif revert:
        result = snapshots.revert_snapshot(name, revert, hosts, progress=progress)
    else:
        result = snapshots.delete_snapshot(name, delete, hosts, progress=progress)
    _report(result, json)


@task(help={"name": "VM name", "file": "the export's qcow2 on this machine; its description is written to FILE.json",
            "force": "replace FILE and FILE.json when they exist",
            "snapshot": "export this internal snapshot (vm.snapshot) instead of the disk's current state",
            **{k: SELECT_HELP[k] for k in ("inventory", "json")}})
@user_errors
def export(c, name, file, force=False, snapshot=None, inventory=None, json=False):
    """Export a running or stopped VM to FILE: a flattened qcow2 (no backing file) and FILE.json describing it."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    from cloudops.compute import export as exporting
    from cloudops.compute import snapshots

    if snapshot is not None:
        snapshots.validate_snapshot_name(snapshot)
    exporting.check_target(file, force)  # refused before any host is asked
    result = exporting.export_vm(name, file, _hypervisors(c, inventory), force=force, progress=progress,
                                 snapshot=snapshot)
    for note in result.notes:
        progress(note)
    _report(result, json)


@task(name="import", help={
    "file": "an export (vm.export): FILE and its description FILE.json", "name": "the new VM's name",
    "host": "put it on this host (default: the scheduler chooses)",
    "network": "network(s), comma-separated (default: the exported VM's); new addresses and MACs from IPAM",
    "no_wait": "do not wait for SSH", "timeout": "seconds to wait for the IP and SSH",
    **{k: SELECT_HELP[k] for k in ("inventory", "json")}})
@user_errors
def import_(c, file, name, host=None, network=None, no_wait=False, timeout=None, inventory=None, json=False):
    """Start a new VM from an export: checks FILE's sha256 against FILE.json, uploads it as the VM's disk."""
    vms.validate_name(name)  # one line, before the inventory is read or any host asked
    from cloudops.compute import vmimport

    vmimport.read_description(file)  # refused before the inventory is read
    inv = load_inventory(c, inventory)
    vm = vmimport.import_vm(file, name, inv, host=host, network=network, timeout=float(timeout or c.vm.timeout),
                            wait=not no_wait, progress=progress)
    if json:
        emit_json(vm.to_dict())
    else:
        print(f"{vm.name} {vm.host} {vm.ip}")


@task(help={
    "source": "the VM to copy: stopped, or any with --snapshot", "name": "the clone's name (and hostname)",
    "snapshot": "copy this internal snapshot of SOURCE (vm.snapshot), which may run meanwhile",
    "host": "put it on this host (default: the scheduler chooses)", "no_wait": "do not wait for SSH",
    "timeout": "seconds to wait for the IP and SSH", **{k: SELECT_HELP[k] for k in ("inventory", "json")}})
@user_errors
def clone(c, source, name, snapshot=None, host=None, no_wait=False, timeout=None, inventory=None, json=False):
    """Clone a stopped VM, or a snapshot of any: its disk's content with a new name, hostname, MAC, address and
    SSH host keys."""
    vms.validate_name(source)  # one line, before the inventory is read or any host asked
    vms.validate_name(name)
    from cloudops.compute import clone as cloning
    from cloudops.compute import snapshots

    if snapshot is not None:
        snapshots.validate_snapshot_name(snapshot)
    inv = load_inventory(c, inventory)
    vm = cloning.clone_vm(source, name, inv, host=host, timeout=float(timeout or c.vm.timeout), wait=not no_wait,
                          progress=progress, snapshot=snapshot)
    if json:
        emit_json(vm.to_dict())
    else:
        print(f"{vm.name} {vm.host} {vm.ip}")
