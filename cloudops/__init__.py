"""cloudops: operations toolkit for a private cloud of KVM/QEMU hypervisor hosts."""

__version__ = "0.1.0"
