"""Every key prefix cloudops writes in the state store, and who owns it."""

PREFIXES = (
    "ipam/",         # ipam/<network>: allocations and quarantine (cloudops.net.ipam)
    "maintenance/",  # maintenance/<host> (cloudops.hosts.maintenance)
    "images/",       # images/catalog (cloudops.imaging.store)
    "hostkeys/",     # hostkeys/<vm> (cloudops.compute.guest)
    "trust/",        # trust/<fingerprint>: control machines' cloud public keys (cloudops.compute.guest)
    "migrating/",    # migrating/<vm>: the migration journal (cloudops.migration.journal)
    "migrations/",   # migrations/<time>-<vm>: history (cloudops.migration.migrate)
    "locks/",        # leased locks (cloudops.state.store.Store.lock)
)
