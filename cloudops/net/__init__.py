"""Networks: libvirt networks from validated specs (``networks``) and cloud-wide addresses (``ipam``)."""
