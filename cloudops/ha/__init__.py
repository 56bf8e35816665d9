"""High availability: find dead hypervisors, fence them, restart their shared-storage VMs elsewhere.

``probe`` says which hosts answer; ``fencing`` runs the inventory's ``fence_command`` of a host;
``failover`` plans and carries out the restarts of one dead host's VMs; ``comeback`` tidies a host
that returns; ``watch`` is one cycle of ``cloud.watch`` over all of them, remembering in the state
store since when each host is missing; ``figures`` ships the timings to Graphite.
"""
