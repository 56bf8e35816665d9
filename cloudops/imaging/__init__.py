"""Images: the store (add once, get an id, copy to hosts where missing), building and customizing disks.

``store`` (the catalog and copies), ``build`` (recipes in ``recipes/``, cached by content hash),
``customize`` over ``appliance`` (one libguestfs launch per batch), ``kernel`` (PVH vmlinux).
"""
