"""A stand-in for a libvirt connection that answers what metrics_collect asks, from plain dicts.

The stats dicts have the shape (keys and units) of qemu's getAllDomainStats records.
"""

import libvirt


class FakeDomain:
    def __init__(self, name, uuid, domain_id):
        self._name, self._uuid, self._id = name, uuid, domain_id

    def name(self):
        return self._name

    def UUIDString(self):
        return self._uuid

    def ID(self):
        return self._id


class FakePool:
    def __init__(self, name, capacity, allocation, available):
        self._name = name
        self._info = [libvirt.VIR_STORAGE_POOL_RUNNING, capacity, allocation, available]

    def name(self):
        return self._name

    def info(self):
        return self._info


class FakeConnection:
    """``vms``: name -> (uuid, domain_id, stats dict); ``cpu_times``: getCPUStats answer."""

    def __init__(self, vms=None, cpu_times=None, pools=None, memory_stats=True, fail_stats=False):
        self.vms = dict(vms or {})
        self.cpu_times = cpu_times or {"kernel": 0, "user": 0, "idle": 0, "iowait": 0}
        self.pools = pools if pools is not None else [FakePool("default", 100 << 30, 40 << 30, 60 << 30)]
        self.memory_stats = memory_stats
        self.fail_stats = fail_stats
        self.calls = []

    def getAllDomainStats(self, stats, flags):
        self.calls.append(("getAllDomainStats", stats, flags))
        if self.fail_stats:
            raise libvirt.libvirtError("Cannot recv data: Connection reset by peer")
        return [(FakeDomain(name, uuid, dom_id), dict(st)) for name, (uuid, dom_id, st) in self.vms.items()]

    def getInfo(self):
        return ["x86_64", 16384, 8, 2400, 1, 1, 4, 2]

    def getFreeMemory(self):
        return 8 << 30

    def getMemoryStats(self, cell, flags=0):
        if not self.memory_stats:
            raise libvirt.libvirtError("this function is not supported by the connection driver")
        return {"total": 16 << 20, "free": 8 << 20, "buffers": 1 << 20, "cached": 2 << 20}

    def getCPUStats(self, cpu, flags=0):
        return dict(self.cpu_times)

    def listAllStoragePools(self, flags=0):
        return list(self.pools)


def vm_stats(cpu_ns=0, vcpu_ns=(0, 0), delay_ns=None, rd_bytes=0, rd_reqs=0, rd_ns=0,
             wr_bytes=0, wr_reqs=0, wr_ns=0, rx_bytes=0, tx_bytes=0, state=libvirt.VIR_DOMAIN_RUNNING):
    """A running VM's getAllDomainStats record with one disk (vda) and one interface (vnet3)."""
    stats = {
        "state.state": state, "state.reason": 1,
        "cpu.time": cpu_ns, "cpu.user": cpu_ns // 2, "cpu.system": cpu_ns // 4,
        "balloon.current": 1048576, "balloon.maximum": 2097152, "balloon.rss": 524288,
        "balloon.usable": 700000, "balloon.unused": 600000, "balloon.available": 1000000,
        "balloon.swap_in": 0, "balloon.swap_out": 0, "balloon.major_fault": 10,
        "vcpu.current": len(vcpu_ns), "vcpu.maximum": len(vcpu_ns),
        "block.count": 1, "block.0.name": "vda", "block.0.path": "/var/lib/libvirt/images/vm.qcow2",
        "block.0.rd.reqs": rd_reqs, "block.0.rd.bytes": rd_bytes, "block.0.rd.times": rd_ns,
        "block.0.wr.reqs": wr_reqs, "block.0.wr.bytes": wr_bytes, "block.0.wr.times": wr_ns,
        "block.0.fl.reqs": 0, "block.0.fl.times": 0,
        "block.0.allocation": 1 << 30, "block.0.capacity": 10 << 30, "block.0.physical": 1 << 30,
        "net.count": 1, "net.0.name": "vnet3",
        "net.0.rx.bytes": rx_bytes, "net.0.rx.pkts": rx_bytes // 1000, "net.0.rx.errs": 0, "net.0.rx.drop": 0,
        "net.0.tx.bytes": tx_bytes, "net.0.tx.pkts": tx_bytes // 1000, "net.0.tx.errs": 0, "net.0.tx.drop": 0,
    }
    for n, ns in enumerate(vcpu_ns):
        stats[f"vcpu.{n}.state"] = 1
        stats[f"vcpu.{n}.time"] = ns
        stats[f"vcpu.{n}.wait"] = 0
        if delay_ns is not None:
            stats[f"vcpu.{n}.delay"] = delay_ns[n]
    return stats


def libvirt_test_host(monkeypatch):
    """libvirt's in-process test driver as the one host hv1: virt.open_host and vms.find answer from it.

    Domains named ``u-*`` left by an earlier test are removed first. Returns (conn, host, inventory)."""
    import contextlib
    from types import SimpleNamespace

    from cloudops import virt
    from cloudops.compute import vms
    from cloudops.inventory import Inventory

    conn = libvirt.open("test:///default")
    for dom in conn.listAllDomains():
        if dom.name().startswith("u-"):
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            dom.undefine()
    hv = SimpleNamespace(name="hv1", tags=(), vars={})

    @contextlib.contextmanager
    def open_host(_host, uri=None):
        yield conn

    monkeypatch.setattr(virt, "open_host", open_host)
    monkeypatch.setattr(vms, "find", lambda name, hosts: ([hv] if vms.defined_on(conn, name) else [], []))
    return conn, hv, Inventory(path="inv.yaml", hosts={"hv1": hv}, groups={"all": ["hv1"]})


def pool_test_host(monkeypatch, prefix="u-"):
    """``libvirt_test_host`` and its pool "default-pool", emptied of the volumes an earlier test left (``prefix``)."""
    conn, hv, inventory = libvirt_test_host(monkeypatch)
    pool = conn.storagePoolLookupByName("default-pool")
    for name in pool.listVolumes():
        if name.startswith(prefix):
            pool.storageVolLookupByName(name).delete(0)
    return conn, hv, inventory, pool
