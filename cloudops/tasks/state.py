"""The cloud's shared state: where it is, import from an older cloudops, check it against the hosts."""

from invoke import Exit, task

from cloudops import output, paths, state
from cloudops.tasks._cli import SELECT_HELP, emit_json, load_inventory, progress, user_errors


@task(help={"prefix": "only keys under this prefix (e.g. ipam/ or maintenance/)", "json": SELECT_HELP["json"]})
@user_errors
def show(c, prefix="", json=False):
    """Which store this machine uses, and its keys (values with --json)."""
    store = state.current()
    entries = {key: entry for p in ([prefix] if prefix else state.keys.PREFIXES) for key, entry in store.items(p).items()}
    if json:
        emit_json({"store": store.describe(), "keys": {k: {"version": e.version, "value": e.value}
                                                       for k, e in sorted(entries.items())}})
        return
    print(f"state store: {store.describe()}")
    rows = [{"key": k, "version": e.version, "bytes": len(str(e.value))} for k, e in sorted(entries.items())]
    print(output.table(rows, ["key", "version", "bytes"]) if rows else "no keys")


@task(name="import", help={"source": "state directory of the older cloudops (default: this machine's)",
                           "dry_run": "say what would be added, write nothing", "json": SELECT_HELP["json"]})
@user_errors
def import_(c, source=None, dry_run=False, json=False):
    """Copy the JSON state files of an older cloudops (var/cloud, var/images) into the configured store."""
    from cloudops.state import importer

    store = state.current()
    source = source or paths.var_dir()
    report = importer.apply(store, importer.read_legacy(source), dry_run=dry_run)
    if json:
        emit_json({"store": store.describe(), "source": str(source), "dry_run": dry_run, **report.to_dict()})
    else:
        verb = "would add" if dry_run else "added"
        print(f"{source} -> {store.describe()}: {verb} {len(report.added)}, already there {len(report.unchanged)}, "
              f"conflicts {len(report.conflicts)}")
        for key in report.conflicts:
            print(f"conflict (left as the store has it): {key}")
        if not report.added and not report.conflicts:
            print("nothing to import: the store already has all of it")
    if report.conflicts:
        raise Exit(code=1)


@task(help={"inventory": SELECT_HELP["inventory"], "json": SELECT_HELP["json"]})
@user_errors
def check(c, inventory=None, json=False):
    """Compare the store with what the hypervisors run; list orphans both ways. Exit 1 when anything is off."""
    from cloudops.imaging import store as images
    from cloudops.state import check as checking

    hosts = load_inventory(c, inventory).hypervisors()
    progress(f"asking {len(hosts)} hosts for their VMs and image files")
    local = {p.name.split(".")[0] for p in images.store_dir().glob("*")} if images.store_dir().is_dir() else set()
    report = checking.compare(state.current(), checking.gather(hosts, local))
    if json:
        emit_json(report.to_dict())
    else:
        for finding in report.findings:
            print(f"{finding.kind}: {finding.key}: {finding.detail}")
        for host in report.unreachable:
            print(f"unreachable, not checked: {host}")
        if report.clean:
            print(f"state store and {len(hosts)} hosts agree ({report.vms} VMs)")
    if not report.clean:
        raise Exit(code=1)
