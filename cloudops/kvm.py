"""Whether KVM is usable, in one place: asked of a host's libvirt, of this machine, or of a host by shell.

The rule: a real KVM, not the paravirtual ``kvm_pvm`` of nested sandboxes (on the machines this was
built on it offers /dev/kvm and the kvm domain type, yet guests hang), on a CPU with VMX or SVM.
Without it VMs run under QEMU TCG (domain type ``qemu``) and libguestfs is forced to TCG.
"""

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

VIRT_FLAGS = ("vmx", "svm")
PARAVIRT_MODULE = "kvm_pvm"

# one line for a host's facts script: prints "kvm<TAB>yes" or "kvm<TAB>no"
PROBE_SH = (f"if [ -c /dev/kvm ] && grep -qwE '{'|'.join(VIRT_FLAGS)}' /proc/cpuinfo"
            f" && ! grep -q '^{PARAVIRT_MODULE} ' /proc/modules 2>/dev/null; then\n"
            "  printf 'kvm\\tyes\\n'; else printf 'kvm\\tno\\n'; fi")


def domain_type(conn) -> str:
    """``kvm`` where the host offers a kvm domain type and its CPU has VMX/SVM, else ``qemu`` (TCG).

    /dev/kvm alone is not enough: a paravirtual KVM lists the kvm domain type, yet its CPU shows
    no VMX/SVM flag.
    """
    try:
        caps = ET.fromstring(conn.getCapabilities())
    except libvirt.libvirtError:
        return "qemu"
    kvm_listed = any(d.get("type") == "kvm" for d in caps.findall("./guest/arch/domain"))
    virt_flags = any(f.get("name") in VIRT_FLAGS for f in caps.findall("./host/cpu/feature"))
    return "kvm" if kvm_listed and virt_flags else "qemu"


def usable_here() -> bool:
    """True if this machine's /dev/kvm opens and is a real KVM (not the paravirtual kvm_pvm)."""
    if Path(f"/sys/module/{PARAVIRT_MODULE}").exists():
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True
