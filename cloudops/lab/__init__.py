"""The local lab: hypervisor hosts in network namespaces of this machine (``hosts``)."""
