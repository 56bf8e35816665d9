"""Inventory loading (native and Ansible YAML), precedence, selection and one-line errors."""

import json
import os
import textwrap
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudops import inventory, paths, sshcommand
from cloudops.errors import CloudopsError
from cloudops.inventory import Capacity, Host

NATIVE = """
vars: {user: admin, pool_path: /var/lib/cloudops, color: all}
hosts:
  hv1: {address: 10.251.0.11, port: 2201, key: /keys/id_ed25519, tags: [ssd], capacity: {memory_mb: 4096, vcpus: 8}}
  hv2: {address: 10.251.0.12, vars: {color: host}}
  web1: {address: 10.251.0.21}
groups:
  hypervisors: {hosts: [hv1, hv2], vars: {color: hypervisors, bridge: br0}}
  edge: {hosts: [hv2, web1], vars: {color: edge}}
"""

ANSIBLE = """
all:
  vars: {ansible_user: admin, color: all}
  hosts:
    lonely: {ansible_host: 10.0.0.9}
  children:
    hypervisors:
      vars: {color: hypervisors}
      children:
        rack_a:
          vars: {color: rack_a}
          hosts:
            hv1: {ansible_host: 10.251.0.11, ansible_port: 2201, ansible_ssh_private_key_file: /keys/k}
            hv2:
        rack_b:
          hosts:
            hv3: {cloudops_tags: [ssd], capacity: {vcpus: 4}}
    edge:
      vars: {color: edge}
      hosts:
        hv2: {ansible_host: 10.251.0.12, color: host}
"""


def write(tmp_path, text, name="inv.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path, text):
    return inventory.load(write(tmp_path, text))


def error_of(tmp_path, text) -> str:
    path = write(tmp_path, text)
    with pytest.raises(CloudopsError) as info:
        inventory.load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


# ---------------------------------------------------------------- native format


def test_native_hosts_fields_and_file_order(tmp_path):
    inv = load_text(tmp_path, NATIVE)
    assert list(inv.hosts) == ["hv1", "hv2", "web1"]
    hv1 = inv.hosts["hv1"]
    assert (hv1.address, hv1.user, hv1.port, hv1.key) == ("10.251.0.11", "admin", 2201, "/keys/id_ed25519")
    assert hv1.capacity == Capacity(memory_mb=4096, vcpus=8)
    assert hv1.tags == ("ssd",)
    assert hv1.groups == ("hypervisors",)
    assert inv.groups == {"all": ["hv1", "hv2", "web1"], "hypervisors": ["hv1", "hv2"], "edge": ["hv2", "web1"]}


def test_native_defaults(tmp_path):
    host = load_text(tmp_path, "hosts: {hv1: {address: hv1.example.net}}").hosts["hv1"]
    assert (host.user, host.port, host.key, host.tags, host.groups) == ("root", 22, None, (), ())
    assert host.capacity == Capacity(memory_mb=None, vcpus=None)


def test_native_precedence_all_then_groups_in_file_order_then_host(tmp_path):
    inv = load_text(tmp_path, NATIVE)
    assert inv.hosts["hv1"].vars["color"] == "hypervisors"
    assert inv.hosts["hv2"].vars["color"] == "host"
    assert inv.hosts["web1"].vars["color"] == "edge"  # later group wins
    assert inv.hosts["web1"].vars["pool_path"] == "/var/lib/cloudops"
    assert inv.hosts["hv2"].groups == ("hypervisors", "edge")  # in precedence order, lowest first


def test_native_later_group_wins_whatever_the_member_order(tmp_path):
    inv = load_text(tmp_path, """
        hosts: {hv1: {address: a}}
        groups:
          b: {hosts: [hv1], vars: {x: b}}
          a: {hosts: [hv1], vars: {x: a}}
    """)
    assert inv.hosts["hv1"].vars["x"] == "a"


def test_connection_fields_come_from_vars_at_any_level(tmp_path):
    inv = load_text(tmp_path, """
        vars: {port: 2222}
        hosts: {hv1: {address: a}, hv2: {address: b, port: 22}}
        groups: {g: {hosts: [hv1], vars: {user: ops}}}
    """)
    assert (inv.hosts["hv1"].user, inv.hosts["hv1"].port) == ("ops", 2222)
    assert (inv.hosts["hv2"].user, inv.hosts["hv2"].port) == ("root", 22)


def test_merged_vars_hold_every_key(tmp_path):
    host = load_text(tmp_path, NATIVE).hosts["hv1"]
    assert host.vars == {"user": "admin", "pool_path": "/var/lib/cloudops", "color": "hypervisors", "bridge": "br0",
                         "address": "10.251.0.11", "port": 2201, "key": "/keys/id_ed25519", "tags": ["ssd"],
                         "capacity": {"memory_mb": 4096, "vcpus": 8}}


def test_relative_key_is_relative_to_the_inventory_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = write(tmp_path / "sub", "hosts: {hv1: {address: a, key: ../keys/id}}")
    assert inventory.load(path).hosts["hv1"].key == str(tmp_path / "keys" / "id")


# ---------------------------------------------------------------- Ansible format


def test_ansible_maps_ansible_vars_to_host_fields(tmp_path):
    inv = load_text(tmp_path, ANSIBLE)
    hv1 = inv.hosts["hv1"]
    assert (hv1.address, hv1.user, hv1.port, hv1.key) == ("10.251.0.11", "admin", 2201, "/keys/k")
    assert inv.hosts["hv3"].tags == ("ssd",)
    assert inv.hosts["hv3"].capacity == Capacity(vcpus=4)


def test_ansible_address_defaults_to_the_host_name(tmp_path):
    assert load_text(tmp_path, ANSIBLE).hosts["hv3"].address == "hv3"


def test_ansible_nested_children_and_membership(tmp_path):
    inv = load_text(tmp_path, ANSIBLE)
    assert list(inv.hosts) == ["lonely", "hv1", "hv2", "hv3"]
    assert inv.groups["hypervisors"] == ["hv1", "hv2", "hv3"]
    assert inv.groups["rack_a"] == ["hv1", "hv2"]
    assert inv.groups["edge"] == ["hv2"]
    assert inv.hosts["hv2"].groups == ("edge", "hypervisors", "rack_a")
    assert inv.hosts["lonely"].groups == ()


def test_ansible_host_under_several_groups_is_membership_with_merged_vars(tmp_path):
    hv2 = load_text(tmp_path, ANSIBLE).hosts["hv2"]
    assert hv2.address == "10.251.0.12"
    assert hv2.vars["color"] == "host"


def test_ansible_precedence_deeper_group_wins_then_priority_then_name(tmp_path):
    inv = load_text(tmp_path, """
        all:
          vars: {x: all, y: all, z: all}
          children:
            zeta: {vars: {x: zeta, y: zeta}, hosts: {h1: }}
            alpha:
              vars: {x: alpha, y: alpha, z: alpha}
              hosts: {h1: }
              children: {deep: {vars: {z: deep}, hosts: {h1: }}}
            mid: {vars: {y: mid, ansible_group_priority: 5}, hosts: {h1: }}
    """)
    assert inv.hosts["h1"].vars["x"] == "zeta"  # same depth, same priority: later name wins (as Ansible)
    assert inv.hosts["h1"].vars["y"] == "mid"  # higher ansible_group_priority wins at the same depth
    assert inv.hosts["h1"].vars["z"] == "deep"  # deeper group wins


def test_ansible_top_level_groups_without_all(tmp_path):
    inv = load_text(tmp_path, "hypervisors: {hosts: {hv1: {ansible_host: 10.0.0.1}}}")
    assert inv.groups == {"all": ["hv1"], "hypervisors": ["hv1"]}


def test_yaml_merge_keys_may_repeat_a_key(tmp_path):
    inv = load_text(tmp_path, """
        hosts:
          hv1: &base {address: a, user: ops, port: 2200}
          hv2: {<<: *base, address: b}
    """)
    assert (inv.hosts["hv2"].address, inv.hosts["hv2"].user, inv.hosts["hv2"].port) == ("b", "ops", 2200)


# ---------------------------------------------------------------- libvirt URI and Host


def uri_parts(uri):
    parts = urlsplit(uri)
    return parts.scheme, parts.netloc, parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}


def test_libvirt_uri_is_derived_from_user_address_port():
    scheme, netloc, path, params = uri_parts(Host("hv1", "10.0.0.1").libvirt_uri)
    assert (scheme, netloc, path) == ("qemu+ssh", "root@10.0.0.1:22", "/system")
    assert params == {"command": str(sshcommand.path_for(os.path.expanduser("~/.ssh/known_hosts"))), "no_tty": "1"}


def test_libvirt_uri_verifies_against_the_inventory_known_hosts_strictly():
    host = Host("hv1", "10.0.0.1", key="/k/id", vars={"known_hosts": "/trust/known_hosts"})
    command = sshcommand.path_for("/trust/known_hosts")
    assert host.libvirt_uri == f"qemu+ssh://root@10.0.0.1:22/system?keyfile=/k/id&command={command}&no_tty=1"
    script = sshcommand.render("/trust/known_hosts")
    for option in ("UserKnownHostsFile=/trust/known_hosts", "GlobalKnownHostsFile=/dev/null",
                   "StrictHostKeyChecking=yes", "BatchMode=yes", "ServerAliveInterval="):
        assert f"-o {option}" in script
    assert script.rstrip().endswith('"$@"')


def test_the_ssh_script_quotes_its_known_hosts_path():
    script = sshcommand.render("/a b/kh;touch /tmp/x")
    assert "-o UserKnownHostsFile='/a b/kh;touch /tmp/x'" in script


def test_libvirt_uri_quotes_every_value_and_brackets_ipv6():
    host = Host("hv1", "fd00::1", user="ops", port=2201, key="/keys/my key&x=1",
                vars={"known_hosts": "/a b/kh?#"})
    scheme, netloc, path, params = uri_parts(host.libvirt_uri)
    assert netloc == "ops@[fd00::1]:2201"
    assert "my%20key%26x%3D1" in host.libvirt_uri and " " not in host.libvirt_uri
    assert params == {"keyfile": "/keys/my key&x=1", "command": str(sshcommand.path_for("/a b/kh?#")), "no_tty": "1"}


def test_libvirt_uri_from_inventory_and_explicit_override(tmp_path):
    inv = load_text(tmp_path, """
        vars: {known_hosts: /trust/kh}
        hosts:
          hv1: {address: 10.0.0.1, key: /k/id}
          hv2: {address: 10.0.0.2, libvirt_uri: "qemu:///system"}
    """)
    assert inv.hosts["hv1"].libvirt_uri == (f"qemu+ssh://root@10.0.0.1:22/system?keyfile=/k/id"
                                            f"&command={sshcommand.path_for('/trust/kh')}&no_tty=1")
    assert inv.hosts["hv2"].libvirt_uri == "qemu:///system"


def test_to_dict_is_json_ready(tmp_path):
    data = load_text(tmp_path, NATIVE).hosts["hv1"].to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["capacity"] == {"memory_mb": 4096, "vcpus": 8}
    assert data["tags"] == ["ssd"] and data["groups"] == ["hypervisors"]
    assert data["libvirt_uri"].startswith("qemu+ssh://admin@10.251.0.11:2201/")


# ---------------------------------------------------------------- selection


@pytest.fixture
def inv(tmp_path):
    return load_text(tmp_path, NATIVE)


def names(hosts):
    return [host.name for host in hosts]


@pytest.mark.parametrize("kwargs, expected", [
    ({}, ["hv1", "hv2", "web1"]),
    ({"hosts": "hv2"}, ["hv2"]),
    ({"hosts": "web1,hv1"}, ["hv1", "web1"]),  # file order, not argument order
    ({"hosts": ["web1", "hv1, hv2"]}, ["hv1", "hv2", "web1"]),
    ({"hosts": "hv*"}, ["hv1", "hv2"]),
    ({"hosts": "hv[2-9]"}, ["hv2"]),
    ({"groups": "edge"}, ["hv2", "web1"]),
    ({"groups": ["hypervisors", "edge"]}, ["hv1", "hv2", "web1"]),
    ({"groups": "all"}, ["hv1", "hv2", "web1"]),
    ({"hosts": "hv1", "groups": "edge"}, ["hv1", "hv2", "web1"]),  # union
    ({"limit": "edge"}, ["hv2", "web1"]),
    ({"groups": "hypervisors", "limit": "edge"}, ["hv2"]),
    ({"groups": "edge", "limit": "hv*"}, ["hv2"]),
    ({"limit": "hv1,web1"}, ["hv1", "web1"]),
    ({"limit": "!hv2"}, ["hv1", "web1"]),
    ({"groups": "edge", "limit": "all,!hypervisors"}, ["web1"]),
    ({"hosts": "", "groups": None, "limit": ""}, ["hv1", "hv2", "web1"]),
])
def test_select(inv, kwargs, expected):
    assert names(inv.select(**kwargs)) == expected


@pytest.mark.parametrize("kwargs, fragment", [
    ({"hosts": "hv9"}, "unknown host 'hv9'"),
    ({"hosts": "hv1,edge"}, "unknown host 'edge'"),  # a group is not a host
    ({"groups": "core"}, "unknown group 'core'"),
    ({"hosts": "db*"}, "host pattern 'db*' matches nothing"),
    ({"groups": "x*"}, "group pattern 'x*' matches nothing"),
    ({"limit": "nope"}, "unknown host or group 'nope'"),
    ({"limit": "!nope"}, "unknown host or group 'nope'"),
    ({"hosts": "web1", "limit": "hypervisors"}, "limit 'hypervisors' leaves no host selected"),
])
def test_select_errors_name_the_entry_and_the_inventory(inv, kwargs, fragment):
    with pytest.raises(CloudopsError) as info:
        inv.select(**kwargs)
    assert fragment in str(info.value)
    assert f"inventory {inv.path}" in str(info.value)


def test_unknown_host_lists_the_known_ones(inv):
    with pytest.raises(CloudopsError, match=r"unknown host 'hv9' \(inventory .*inv\.yaml; known: hv1, hv2, web1\)$"):
        inv.select(hosts="hv9")


@given(st.lists(st.sampled_from(["hv1", "hv2", "web1"]), min_size=1))
def test_comma_string_and_list_select_the_same_hosts_in_file_order(tmp_path_factory, chosen):
    inv = inventory.load(write(tmp_path_factory.mktemp("inv"), NATIVE))
    by_string = names(inv.select(hosts=",".join(chosen)))
    assert by_string == names(inv.select(hosts=chosen))
    assert by_string == [name for name in inv.hosts if name in chosen]


# ---------------------------------------------------------------- errors: one line, file and key


@pytest.mark.parametrize("text, fragments", [
    ("hosts: {hv1: {address: a, port: '22'}}", ["hosts.hv1.port", "integer in 1..65535", "'22'"]),
    ("hosts: {hv1: {address: a, port: 0}}", ["hosts.hv1.port", "1..65535"]),
    ("hosts: {hv1: {address: a, port: 65536}}", ["hosts.hv1.port", "1..65535"]),
    ("hosts: {hv1: {address: a, port: true}}", ["hosts.hv1.port"]),
    ("vars: {port: x}\nhosts: {hv1: {address: a}}", ["vars.port", "'x'"]),  # names where it was written
    ("hosts: {hv1: {address: a}}\ngroups: {g: {hosts: [hv1], vars: {port: -1}}}", ["groups.g.vars.port"]),
    ("hosts: [hv1, hv2]", ["hosts:", "must be a mapping"]),
    ("hosts: {hv1: {address: a, tags: ssd}}", ["hosts.hv1.tags", "list of strings"]),
    ("hosts: {hv1: {address: a, tags: [ssd, 3]}}", ["hosts.hv1.tags", "list of strings"]),
    ("hosts: {hv1: {address: a, capacity: {memory_mb: -5}}}", ["hosts.hv1.capacity.memory_mb", "positive integer"]),
    ("hosts: {hv1: {address: a, capacity: {vcpus: 2.5}}}", ["hosts.hv1.capacity.vcpus", "positive integer"]),
    ("hosts: {hv1: {address: a, capacity: {disk_gb: 5}}}", ["hosts.hv1.capacity.disk_gb", "unknown key"]),
    ("hosts: {hv1: {address: a, capacity: 4096}}", ["hosts.hv1.capacity", "must be a mapping"]),
    ("hosts: {hv1: {adress: a}}", ["hosts.hv1.adress", "unknown key"]),
    ("hosts: {hv1: {port: 22}}", ["hosts.hv1", "missing 'address'"]),
    ("hosts: {hv1: }", ["hosts.hv1", "missing 'address'"]),
    ("hosts: {hv1: {address: ''}}", ["hosts.hv1.address", "non-empty string"]),
    ("hosts: {hv1: {address: a, vars: {user: x}, user: y}}", ["hosts.hv1.vars.user", "set it once"]),
    ("hosts: {hv1: {address: a}}\ngroups: {g: {hosts: [hv1, hv9]}}", ["groups.g.hosts", "unknown host 'hv9'"]),
    ("hosts: {hv1: {address: a}}\ngroups: {g: {hosts: hv1}}", ["groups.g.hosts", "list of host names"]),
    ("hosts: {hv1: {address: a}}\ngroups: {all: {hosts: [hv1]}}", ["groups.all", "reserved"]),
    ("hosts: {'bad name': {address: a}}", ["hosts", "invalid host name 'bad name'"]),
    ("hosts: {-hv1: {address: a}}", ["hosts", "invalid host name '-hv1'"]),
    (f"hosts: {{{'h' * 64}: {{address: a}}}}", ["invalid host name"]),
    ("hosts: {hv1: {address: a}}\ngroups: {'g/1': {hosts: [hv1]}}", ["groups", "invalid group name 'g/1'"]),
    ("hosts: {hv1: {address: a}}\nhostvars: {}", ["top level.hostvars", "unknown key"]),
    ("- hv1\n- hv2\n", ["top level must be a mapping"]),
    ("", ["file is empty"]),
    ("# nothing yet\n", ["file is empty"]),
    ("all: {hosts: {hv1: {ansible_port: abc}}}", ["all.hosts.hv1.ansible_port", "1..65535"]),
    ("all: {children: {g: {hosts: {'h v': }}}}", ["all.children.g.hosts", "invalid host name 'h v'"]),
    ("all: {children: {g: {host: {hv1: }}}}", ["all.children.g.host", "unknown key"]),
    ("all: {children: {g: {hosts: [hv1]}}}", ["all.children.g.hosts", "must be a mapping"]),
    ("all: {children: {a: {children: {b: }}}}\nb: {children: {a: }}", ["group a", "own descendant", "a > b > a"]),
    ("all: {vars: {ansible_group_priority: high}, hosts: {h: }}", ["all.vars.ansible_group_priority"]),
])
def test_load_errors_name_the_file_and_the_key(tmp_path, text, fragments):
    message = error_of(tmp_path, text)
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path):
    with pytest.raises(CloudopsError, match=r"inventory .*nope\.yaml: file not found$"):
        inventory.load(tmp_path / "nope.yaml")


def test_directory_is_not_an_inventory(tmp_path):
    with pytest.raises(CloudopsError, match=r"cannot read"):
        inventory.load(tmp_path)


def test_yaml_syntax_error_gives_the_line(tmp_path):
    message = error_of(tmp_path, "hosts:\n  hv1: {address: a\n  hv2: {address: b}\n")
    assert " line 3 " in message and "YAML syntax error" in message


def test_unknown_yaml_tag_is_one_line(tmp_path):
    message = error_of(tmp_path, "all:\n  vars:\n    secret: !vault |\n      abc\n")
    assert "line 3" in message and "!vault" in message


@pytest.mark.parametrize("text, line", [
    ("hosts:\n  hv1: {address: a}\n  hv1: {address: b}\n", 3),
    ("hosts:\n  hv1:\n    address: a\n    port: 22\n    port: 23\n", 5),
    ("all:\n  children:\n    g:\n      hosts: {hv1: , hv1: }\n", 4),
])
def test_duplicate_keys_are_refused(tmp_path, text, line):
    message = error_of(tmp_path, text)
    assert f"line {line} " in message and "duplicate key" in message


# ---------------------------------------------------------------- default_path


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    monkeypatch.delenv(inventory.ENV_VAR, raising=False)
    monkeypatch.setattr(paths, "ROOT", tmp_path / "repo")  # no lab inventory unless a test writes one
    monkeypatch.setenv("CLOUDOPS_STATE_DIR", str(tmp_path / "state"))  # an installed cloudops's lab inventory


def test_default_path_precedence(tmp_path, monkeypatch, no_env):
    files = {name: write(tmp_path, "{}", f"{name}.yaml") for name in ("explicit", "env", "config")}
    lab = paths.lab_inventory()
    lab.parent.mkdir(parents=True, exist_ok=True)
    lab.write_text("{}")
    assert inventory.default_path() == lab
    assert inventory.default_path(config_value=str(files["config"])) == files["config"]
    monkeypatch.setenv(inventory.ENV_VAR, str(files["env"]))
    assert inventory.default_path(config_value=str(files["config"])) == files["env"]
    assert inventory.default_path(str(files["explicit"]), str(files["config"])) == files["explicit"]


@pytest.mark.parametrize("kwargs, env, source", [
    ({"explicit": "missing.yaml"}, None, "given explicitly"),
    ({}, "missing.yaml", "from $CLOUDOPS_INVENTORY"),
    ({"config_value": "missing.yaml"}, None, "from invoke config 'inventory'"),
])
def test_default_path_missing_says_which_source_chose_it(monkeypatch, no_env, kwargs, env, source):
    if env:
        monkeypatch.setenv(inventory.ENV_VAR, env)
    with pytest.raises(CloudopsError, match=rf"inventory missing\.yaml \({source.replace('$', '[$]')}\) does not exist"):
        inventory.default_path(**kwargs)


def test_default_path_missing_lab_suggests_lab_up(no_env):
    with pytest.raises(CloudopsError, match=r"lab inventory .*inventory/lab\.yaml does not exist: run `invoke lab\.up`"):
        inventory.default_path()


# ---------------------------------------------------------------- the examples in the repository


@pytest.mark.parametrize("name", ["example.yaml", "ansible-example.yaml"])
def test_example_inventories_load(name):
    inv = inventory.load(paths.ROOT / "inventory" / name)
    assert inv.hosts and inv.select(groups="hypervisors")
    assert all(host.libvirt_uri.startswith(("qemu+ssh://", "qemu+tls://")) for host in inv.hosts.values())
    assert not any("no_verify" in host.libvirt_uri for host in inv.hosts.values())


def test_examples_describe_the_same_precedence():
    native = inventory.load(paths.ROOT / "inventory" / "example.yaml").hosts
    ansible = inventory.load(paths.ROOT / "inventory" / "ansible-example.yaml").hosts
    assert native["hv1"].capacity == ansible["hv1"].capacity == Capacity(4096, 8)
    assert native["hv2"].tags == ansible["hv2"].tags == ("ssd", "edge")


def test_the_ssh_script_is_written_once_even_when_hosts_open_in_parallel(tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("CLOUDOPS_VAR", str(tmp_path))
    threads = [threading.Thread(target=sshcommand.ensure, args=("/trust/kh",)) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = sshcommand.path_for("/trust/kh")
    assert path.read_text() == sshcommand.render("/trust/kh") and os.access(path, os.X_OK)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_hypervisors_are_every_host_but_the_bare_ones(tmp_path):
    inv = load_text(tmp_path, """
hosts:
  hv1: {address: 10.0.0.1, tags: [ssd]}
  fan1: {address: 10.0.0.2, tags: [bare]}
  hv2: {address: 10.0.0.3}
""")
    assert [h.name for h in inv.hypervisors()] == ["hv1", "hv2"]
    assert [h.name for h in inventory.hypervisors(reversed(list(inv.hosts.values())))] == ["hv2", "hv1"]
    assert not inventory.is_hypervisor(inv.hosts["fan1"]) and inventory.is_hypervisor(inv.hosts["hv1"])
