"""The root task namespace: one collection per noun (`invoke lab.up`, `invoke host.facts`, ...)."""

from invoke import Collection, task

from tasks import cloud, fleet, graphite, host, image, lab, net, vm
from tasks._cli import user_errors

ns = Collection()
for module in (lab, fleet, host, image, net, vm, cloud, graphite):
    ns.add_collection(Collection.from_module(module))

# Defaults live here; override them in invoke.yaml / fabric.yaml, ~/.invoke.yaml or INVOKE_* variables.
ns.configure({
    "inventory": None,
    "lab": {"prefix": "co"},
    "fleet": {"workers": 16, "timeout": 60},
    "vm": {"image": "tiny", "memory": 128, "vcpus": 1, "customize": "seed", "timeout": 180},
    "graphite": {"directory": None, "line_port": 2003, "pickle_port": 2004, "query_port": 7002},
})


@task(help={"hosts": "lab hosts for the demo"})
@user_errors
def demo(c, hosts=2):
    """The main job on the local lab: bring it up and show every host's facts."""
    from cloudops import lab as lab_lib

    prefix = c.lab.prefix
    if not lab_lib.status(prefix)["up"]:
        c.run(f"invoke lab.up --hosts {int(hosts)}")
    c.run("invoke host.facts")
    print("\nThe lab stays up for you to explore (`ssh hv1`, `invoke fleet.run hostname`); `invoke lab.down` ends it.")


ns.add_task(demo)
