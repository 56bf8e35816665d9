"""Migration and balancing: live migration that never loses a VM, recovery, rebalance, evacuation.

``migrate`` (one VM, with ``journal`` and ``outcome`` for faults, ``recover`` to settle them);
``balance`` (pure planning, ``balance_search`` its engine) over ``cluster`` (the live model);
``rebalance`` and ``evacuate`` apply plans one migration at a time.
"""
