"""Peer-to-peer image distribution: the schedule (copies double each round), the image key's authorized_keys
line, the image receiver's name rule, and the command a source host runs (every value quoted)."""

import math
import shlex
import subprocess

import pytest

from cloudops import cloudkeys
from cloudops.errors import CloudopsError
from cloudops.imaging import distribution
from cloudops.imaging.store import Image
from cloudops.inventory import Host

C = distribution.CONTROL
PUBLIC = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq1 cloudops-image@test"


@pytest.mark.parametrize("targets", [1, 2, 3, 7, 8, 9, 31])
def test_one_holder_reaches_n_targets_in_ceil_log2_n_plus_1_rounds(targets):
    names = [f"hv{i}" for i in range(1, targets + 1)]
    rounds = distribution.plan([C], names)
    assert len(rounds) == math.ceil(math.log2(targets + 1))
    assert sorted(t for r in rounds for _s, t in r) == sorted(names)  # every target once


def test_every_holder_serves_one_target_a_round_and_the_served_serve_next():
    rounds = distribution.plan([C], [f"hv{i}" for i in range(1, 9)])
    assert rounds == [[(C, "hv1")], [(C, "hv2"), ("hv1", "hv3")],
                      [(C, "hv4"), ("hv1", "hv5"), ("hv2", "hv6"), ("hv3", "hv7")], [(C, "hv8")]]
    holders = {C}
    for pairs in rounds:
        sources = [s for s, _t in pairs]
        assert len(set(sources)) == len(sources) and set(sources) <= holders  # one copy per holder, holders only
        holders |= {t for _s, t in pairs}


def test_hosts_that_hold_it_already_serve_from_the_first_round_and_the_control_machine_is_optional():
    assert distribution.plan([C, "hv1", "hv2"], ["hv3", "hv4", "hv5"]) == [[(C, "hv3"), ("hv1", "hv4"), ("hv2", "hv5")]]
    assert distribution.plan(["hv1"], ["hv2", "hv3"]) == [[("hv1", "hv2")], [("hv1", "hv3")]]
    assert distribution.plan([C], []) == []
    with pytest.raises(CloudopsError, match="no holder"):
        distribution.plan([], ["hv1"])


def test_the_image_key_is_authorized_for_the_receiver_only_from_the_clouds_hosts():
    line = cloudkeys.authorized_image_key(PUBLIC, ["10.0.0.11", "10.0.0.12"])
    assert line == f'restrict,from="10.0.0.11,10.0.0.12",command="{cloudkeys.RECEIVER}" {PUBLIC}'
    assert line != cloudkeys.authorized_migration_key(PUBLIC, ["10.0.0.11", "10.0.0.12"])


@pytest.mark.parametrize("sources, public, receiver, text", [
    ([], PUBLIC, cloudkeys.RECEIVER, "from no host"),
    (['10.0.0.1",command="sh'], PUBLIC, cloudkeys.RECEIVER, "plain host names"),
    (["10.0.0.1"], "ssh-ed25519 AAAA\nssh-rsa BBBB", cloudkeys.RECEIVER, "image public key is not one"),
    (["10.0.0.1"], PUBLIC, "/opt/x\" sh", "absolute path of plain characters"),
])
def test_a_bad_image_key_line_is_refused_in_one_line(sources, public, receiver, text):
    with pytest.raises(CloudopsError, match=text) as info:
        cloudkeys.authorized_image_key(public, sources, receiver)
    assert "\n" not in str(info.value)


def test_the_receivers_names_are_exactly_the_files_the_store_gives_hosts():
    sha = "ab" * 32
    image = Image(id=sha, name="x", format="qcow2", virtual_size=1, size=1, added=0,
                  boot={"cmdline": "ro", "kernel": "cd" * 32, "initrd": "ef" * 32})
    for remote, _digest in image.files().values():
        assert cloudkeys.IMAGE_FILE_RE.match(remote)
    for bad in ("../x", f"a/{sha}.qcow2", f"{sha}.qcow2/..", f".{sha}.qcow2", f"{sha}.sh", sha, f"{sha[:-1]}.raw"):
        assert not cloudkeys.IMAGE_FILE_RE.match(bad), bad


def test_the_receiver_script_is_valid_bash_naming_the_pools_images_directory():
    script = cloudkeys.receiver_script("/srv/pool")
    assert "images=/srv/pool/images" in script and cloudkeys.IMAGE_FILE_RE.pattern in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_a_source_host_streams_each_file_into_the_destinations_receiver_with_the_image_key_and_its_own_trust():
    image = Image(id="ab" * 32, name="x", format="qcow2", virtual_size=1, size=1, added=0)
    source = Host("hv1", "10.0.0.11", vars={"pool_path": "/var/lib/my pool"})
    dest = Host("hv2", "10.0.0.12", port=2222)
    command = distribution.peer_command(image, source, dest, image.files())
    argv = shlex.split(command)
    assert argv[-2:] == ["<", f"/var/lib/my pool/images/{image.filename}"]
    assert argv[argv.index("-i") + 1] == "/root/.ssh/cloudops_images" and argv[1:3] == ["-F", "/dev/null"]
    for option in ("BatchMode=yes", "StrictHostKeyChecking=yes", "UserKnownHostsFile=/root/.ssh/known_hosts",
                   "IdentitiesOnly=yes"):
        assert option in argv
    assert argv[argv.index("-p") + 1] == "2222" and f"root@10.0.0.12" in argv
    assert argv[-4:-2] == [image.filename, image.id]


def test_tree_is_the_default_way_and_an_unknown_way_is_one_line():
    from cloudops.imaging import store

    assert store.DEFAULT_WAY == "tree" and set(store.WAYS) == {"tree", "parallel", "sequential"}
    image = Image(id="ab" * 32, name="x", format="qcow2", virtual_size=1, size=1, added=0)
    with pytest.raises(CloudopsError, match="unknown way 'p2p' to distribute an image: tree, parallel, sequential"):
        store.distribute(image, [], way="p2p")


def test_a_copy_from_this_machine_checks_the_hosts_key_against_the_inventorys_known_hosts_only():
    from cloudops.imaging import store

    host = Host("hv1", "10.0.0.11", key="/k/id", vars={"known_hosts": "/k/known_hosts"})
    argv = store._ssh_from_here(host)
    for option in ("BatchMode=yes", "StrictHostKeyChecking=yes", "UserKnownHostsFile=/k/known_hosts",
                   "GlobalKnownHostsFile=/dev/null", "IdentitiesOnly=yes"):
        assert option in argv
    assert argv[1:3] == ["-F", "/dev/null"] and argv[argv.index("-i") + 1] == "/k/id" and argv[-1] == "root@10.0.0.11"
