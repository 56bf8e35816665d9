"""Every key prefix cloudops writes in the state store, and who owns it."""

PREFIXES = (
    "ipam/",         # ipam/<network>: allocations and quarantine (cloudops.net.ipam)
    "maintenance/",  # maintenance/<host> (cloudops.hosts.maintenance)
    "images/",       # images/catalog (cloudops.imaging.store)
    "hostkeys/",     # hostkeys/<vm> (cloudops.compute.guest)
    "trust/",        # trust/<fingerprint>: control machines' cloud public keys (cloudops.compute.guest)
    "migrating/",    # migrating/<vm>: the migration journal (cloudops.migration.journal)
    "migrations/",   # migrations/<time>-<vm>: history (cloudops.migration.migrate)
    "vms/",          # vms/<name>: each VM's record, its definition (cloudops.compute.records)
    "ha/",           # ha/<host>: since when a host is missing, its fencing and failover (cloudops.ha.watch)
    "failovers/",    # failovers/<time>-<host>: history of failovers (cloudops.ha.failover)
    "locks/",        # leased locks (cloudops.state.store.Store.lock)
)
