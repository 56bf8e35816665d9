"""Peer-to-peer image distribution: every holder of an image serves one more host, so the copies double each round.

``plan`` is the schedule (pure): given the holders (this machine, ``CONTROL``, and the hosts that already
have the image) and the targets, rounds in which every holder serves one target. ``tree`` runs it without
waiting for a round's slowest copy: a holder takes the next target as soon as its copy is done, and a
target that received the image serves from then on. A copy from this machine is the store's own
(``store.put_files``: SFTP, sha256 checked on the host, rename). A copy between two hosts runs on the
source host, started over a verified Fabric connection: OpenSSH with the host's image key
(``cloudkeys.HOST_IMAGE_KEY``), checking the destination's host key against the source's own
known_hosts, streams the file into the destination's image receiver (``cloudkeys.RECEIVER``: temp name,
sha256, rename). A failed copy is tried once more from another holder; a target that fails both is
reported failed in one line while the others go on. Nothing half-made stays: the receiver and
``_put_verified`` remove their temporary files on every failure.
"""

import shlex
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from cloudops import cloudkeys, fleet
from cloudops.errors import CloudopsError
from cloudops.imaging import store
from cloudops.progress import bar_for, no_progress
from cloudops.ssh import connect

CONTROL = "(control)"  # this machine, as a holder: its image store
TRIES = 2  # sources a target is tried from before it is reported failed
CIPHERS = store.STREAM_CIPHERS


def plan(holders: list[str], targets: list[str]) -> list[list[tuple[str, str]]]:
    """Rounds of (source, target): in each round every holder serves one target, and the targets served join
    the holders of the next round. 1 holder and N targets take ceil(log2(N + 1)) rounds."""
    if not holders and targets:
        raise CloudopsError("no holder of the image: nothing to copy it from")
    holders, todo, rounds = list(holders), deque(targets), []
    while todo:
        pairs = [(source, todo.popleft()) for source in holders[:len(todo)]]
        rounds.append(pairs)
        holders += [target for _source, target in pairs]
    return rounds


def home_of(host) -> str:
    """The home (of the user libvirtd and the image key live under) on ``host``: root's, unless the inventory says."""
    return str(host.vars.get("migration_home") or cloudkeys.HOST_HOME).rstrip("/")


def peer_ssh(source, dest) -> list[str]:
    """OpenSSH on ``source`` to ``dest`` with the image key: no config file but these options, the destination's
    host key checked against the source's own known_hosts, never asked about (batch mode)."""
    home = home_of(source)
    return ["ssh", "-F", "/dev/null", "-i", f"{home}/{cloudkeys.HOST_IMAGE_KEY}", "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={home}/.ssh/known_hosts",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3", "-c", CIPHERS, "-p", str(dest.port), f"{dest.user}@{dest.address}"]


def peer_command(image: store.Image, source, dest, files: dict) -> str:
    """The shell command that, run on ``source``, copies ``files`` ({local: (remote name, sha256)}) to ``dest``."""
    ssh = peer_ssh(source, dest)
    directory = f"{store.pool_path(source)}/images"
    steps = [" ".join(shlex.quote(a) for a in [*ssh, remote, digest]) + " < " + shlex.quote(f"{directory}/{remote}")
             for remote, digest in files.values()]
    return " && ".join(steps)


class SourceFailed(CloudopsError):
    """The source host of a copy could not be reached: it serves no more targets."""


def copy_between(image: store.Image, source, dest, files: dict, timeout: float) -> None:
    """Copy ``files`` of ``image`` from host ``source`` to host ``dest``; raises with one line when it failed."""
    try:
        conn = connect(source)
        conn.open()
    except Exception as exc:
        raise SourceFailed(f"from {source.name}: {fleet.describe(exc)}") from None
    with conn:
        res = conn.run(fleet.bounded(peer_command(image, source, dest, files), timeout), hide=True, warn=True,
                       in_stream=False, timeout=timeout + fleet.GRACE)
    if res.exited != 0:
        lines = res.stderr.strip().splitlines()
        why = lines[-1] if lines else f"exit {res.exited}"
        if res.exited in fleet.TIMEOUT_EXITS:
            why = f"timed out after {timeout:g}s"
        raise CloudopsError(f"from {source.name}: {why}")


def tree(image: store.Image, hosts: list, progress=no_progress, timeout: float = 1800) -> fleet.FleetResult:
    """Copy ``image`` to every host that lacks it, each holder serving the next; one result per host."""
    by_name = {h.name: h for h in hosts}

    def missing(host):
        with connect(host) as conn:
            return store.missing_on_host(image, host, conn)

    found = fleet.run(hosts, missing, timeout=60)
    results: dict[str, fleet.HostResult] = {}
    lacking: dict[str, dict] = {}
    for r in found:
        if r.status == fleet.FAILED:
            results[r.host] = r
        elif r.value:
            lacking[r.host] = r.value
        else:
            results[r.host] = fleet.HostResult(r.host, fleet.OK, "present", seconds=r.seconds)
            store._record_host(image, r.host)
    local = all((store.store_dir() / name).exists() for name in image.files())
    free = deque(([CONTROL] if local else []) + [name for name, r in results.items() if r.status == fleet.OK])
    if lacking and not free:
        where = ", ".join(store.recorded_hosts(image)) or "none recorded"
        raise CloudopsError(f"image {image.name} is neither in this machine's image store nor on any of the hosts "
                            f"(hosts that hold it: {where})")
    pending, tried, errors = deque(lacking), {name: [] for name in lacking}, {name: [] for name in lacking}
    t0 = {}

    def copy(source: str, target: str) -> None:
        dest, files = by_name[target], lacking[target]
        total = sum(size_of(image, local) for local in files)
        label = f"image {image.name} {'control' if source == CONTROL else source} -> {target}"
        if source == CONTROL:
            try:
                with connect(dest) as conn:
                    store.put_files(image, dest, conn, files, progress, label)
            except Exception as exc:
                raise CloudopsError(f"from control: {fleet.describe(exc).removeprefix(f'{target}: ')}") from None
            return
        with bar_for(progress, label, total) as bar:
            copy_between(image, by_name[source], dest, files, timeout)
            bar.update(total)

    running = {}
    with ThreadPoolExecutor(max_workers=len(hosts) + 1) as pool:
        while pending or running:
            for _ in range(len(pending)):  # every free holder takes a target it has not failed yet
                target = pending.popleft()
                source = next((s for s in free if s not in tried[target]), None)
                if source is None:
                    pending.append(target)
                    continue
                free.remove(source)
                tried[target].append(source)
                t0.setdefault(target, time.monotonic())
                running[pool.submit(copy, source, target)] = (source, target)
            if not running:  # no free holder is left that has not failed these targets
                for target in pending:
                    results[target] = _failed(target, errors[target] or ["no holder left to copy from"], t0)
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                source, target = running.pop(future)
                exc = future.exception()
                if exc is None:
                    store._record_host(image, target)
                    results[target] = fleet.HostResult(target, fleet.CHANGED, f"copied from {_shown(source)}",
                                                       seconds=time.monotonic() - t0[target])
                    free.extend([source, target])
                    continue
                if not isinstance(exc, SourceFailed):
                    free.append(source)
                errors[target].append(fleet.describe(exc) if isinstance(exc, CloudopsError)
                                      else f"from {_shown(source)}: {fleet.describe(exc)}")  # a bug: still one line
                holders_left = [s for s in [*free, *(s for s, _t in running.values())] if s not in tried[target]]
                if len(tried[target]) < TRIES and holders_left:
                    pending.appendleft(target)
                else:
                    results[target] = _failed(target, errors[target], t0)
    return fleet.FleetResult([results[h.name] for h in hosts])


def _shown(source: str) -> str:
    return "control" if source == CONTROL else source


def _failed(target: str, errors: list[str], t0: dict) -> fleet.HostResult:
    return fleet.HostResult(target, fleet.FAILED, error="; ".join(errors),
                            seconds=time.monotonic() - t0.get(target, time.monotonic()))


def size_of(image: store.Image, local: str) -> int:
    """The size of one of the image's files: the store's copy, else the catalog's (the image file itself)."""
    path = store.store_dir() / local
    if path.exists():
        return path.stat().st_size
    return image.size if local == image.filename else 0
