"""Compute: the VM lifecycle (start, stop, delete), where a new VM goes, and what goes into its guest.

``vms`` (the lifecycle) over ``placement`` (facts read from libvirt) and ``scheduler`` (pure
filters and weighers); ``seed`` and ``guestconfig`` for the guest's identity; ``guest`` to reach a
VM over SSH; ``stack`` for declarative YAML stacks of networks and VMs.
"""
