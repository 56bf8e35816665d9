"""Metrics: collect from libvirt, ship to Graphite's carbon, spool what carbon did not take.

``cycle`` (one cycle over the fleet) over ``collect`` (one bulk stats call per host), ``rates``
(counters to rates), ``naming`` (every series path), ``carbon`` (the wire), ``spool`` (disk
buffer); ``cron`` installs the cycle on each host; ``graphite`` is a local carbon for tests.
"""
