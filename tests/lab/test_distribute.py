"""Peer-to-peer image distribution on the session lab (issue 15): tree copies, the image receiver's refusals,
and a target that cannot take the image failing alone.

Oracles outside cloudops: ``sha256sum`` of each file on each host over plain ssh (the lab's ssh_config),
and the images directory's listing; the receiver is driven with the image key from a host, as a peer would.
"""

import shlex
import subprocess
from pathlib import Path

import pytest

from cloudops.imaging import distribution
from cloudops.imaging import store as images
from cloudops.lab import hosts as lab_lib
from cloudops.ssh import connect

POOL_IMAGES = f"{lab_lib.POOL_PATH}/images"


def sh(lab, host_name, command, input=None) -> subprocess.CompletedProcess:
    address = lab_lib.load(lab.prefix).host(host_name).address
    return subprocess.run(["ssh", "-F", str(lab.ssh_config_path), address, command], input=input,
                          capture_output=True, text=True, timeout=120)


def listing(lab, host_name) -> list[str]:
    return sh(lab, host_name, f"ls -a {POOL_IMAGES} 2>/dev/null").stdout.split()


def remove(lab, image, names):
    files = " ".join(shlex.quote(f"{POOL_IMAGES}/{remote}") for remote, _s in image.files().values())
    for name in names:
        assert sh(lab, name, f"rm -f {files}").returncode == 0


@pytest.fixture
def hosts(lab, lab_inventory, tiny_image):
    found = [lab_inventory.hosts[h.name] for h in lab.hosts]
    remove(lab, tiny_image, [h.name for h in found])
    yield found
    remove(lab, tiny_image, [h.name for h in found])


def test_tree_copies_to_every_host_through_at_least_one_host_to_host_copy(lab, hosts, tiny_image):
    lines = []
    result = images.distribute(tiny_image, hosts, progress=lines.append)
    assert result.exit_code == 0, result.table()
    sources = {r.host: r.value for r in result}
    assert all(v.startswith("copied from ") for v in sources.values()), sources
    assert any(v != "copied from control" for v in sources.values()), sources  # 1 then 2 holders: 3 hosts in 2 rounds
    assert sum(line.startswith("copied image tiny") and " -> " in line for line in lines) == 3, lines
    for host in hosts:
        for remote, digest in tiny_image.files().values():
            out = sh(lab, host.name, f"sha256sum {shlex.quote(POOL_IMAGES + '/' + remote)}").stdout
            assert out.split()[0] == digest, (host.name, remote)
        assert not [n for n in listing(lab, host.name) if "partial" in n]
    assert set(images.recorded_hosts(tiny_image)) >= {h.name for h in hosts}
    again = images.distribute(tiny_image, hosts)
    assert {r.value for r in again} == {"present"} and again.exit_code == 0


@pytest.mark.parametrize("request_line", [
    "../x {sha}", "a/{name} {sha}", "{name} {wrong}", "{name}", "{name} {sha} extra", "ls /", "",
    "{other}.qcow2 {other}",  # a qcow2 named after a sha256 that is not its own
])
def test_the_receiver_refuses_what_is_not_a_verified_image_file(lab, hosts, tiny_image, request_line):
    hv1, hv2 = hosts[0], hosts[1]
    line = request_line.format(name=tiny_image.filename, sha=tiny_image.id, wrong="0" * 64, other="1" * 64)
    before = listing(lab, hv2.name)
    command = " ".join(shlex.quote(a) for a in distribution.peer_ssh(hv1, hv2)) + (" " + line if line else "")
    with connect(hv1) as conn:  # some bytes on stdin, from a host: what a peer holding the image key can send
        res = conn.run(f"{command} < /etc/os-release", in_stream=False, warn=True, hide=True)
    assert res.exited != 0
    assert res.stderr.strip().splitlines()[-1].startswith("cloudops-receive-image: "), res.stderr
    assert listing(lab, hv2.name) == before  # nothing written, no temp left


def test_a_target_that_cannot_take_the_image_fails_alone_in_one_line(lab, hosts, tiny_image):
    state = lab_lib.load(lab.prefix)
    sh(lab, "hv3", f"mkdir -p {POOL_IMAGES}")
    locked = Path(state.host("hv3").dir) / "var-lib-cloudops" / "images"  # hv3's images directory, from here
    subprocess.run(["chattr", "+i", str(locked)], check=True)  # even root cannot create files in it
    try:
        result = images.distribute(tiny_image, hosts)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert result["hv3"].status == "failed" and "\n" not in result["hv3"].error
    assert result["hv3"].error.count("from ") == 2, result["hv3"].error  # tried from two holders
    assert result["hv1"].status == result["hv2"].status == "changed", result.table()
    for host in hosts:
        assert not [n for n in listing(lab, host.name) if "partial" in n], host.name
    assert not [n for n in listing(lab, "hv3") if n not in (".", "..")]
