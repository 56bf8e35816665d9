"""KVM detection: the kvm domain type only where libvirt lists it and the CPU has VMX/SVM."""

import libvirt
import pytest

from cloudops import facts, kvm

CAPS = """<capabilities><host><cpu>{features}</cpu></host>
<guest><arch name="x86_64"><domain type="qemu"/>{kvm}</arch></guest></capabilities>"""


class Conn:
    def __init__(self, xml=None):
        self.xml = xml

    def getCapabilities(self):
        if self.xml is None:
            raise libvirt.libvirtError("no capabilities")
        return self.xml


@pytest.mark.parametrize(("features", "kvm_domain", "expected"), [
    ('<feature name="vmx"/>', '<domain type="kvm"/>', "kvm"),
    ('<feature name="svm"/>', '<domain type="kvm"/>', "kvm"),
    ('<feature name="sse4.2"/>', '<domain type="kvm"/>', "qemu"),  # a paravirtual KVM: no VMX/SVM
    ('<feature name="vmx"/>', "", "qemu"),
])
def test_domain_type(features, kvm_domain, expected):
    assert kvm.domain_type(Conn(CAPS.format(features=features, kvm=kvm_domain))) == expected


def test_domain_type_without_capabilities_is_tcg():
    assert kvm.domain_type(Conn()) == "qemu"


def test_the_facts_script_asks_the_same_rule():
    assert kvm.PROBE_SH in facts._SYSTEM_SCRIPT
    assert "grep -qwE 'vmx|svm' /proc/cpuinfo" in kvm.PROBE_SH and "'^kvm_pvm '" in kvm.PROBE_SH
