"""What bench/peers.py writes for the peers and reads back from them: pure functions, no I/O.

virt-lightning reads ~/.config/virt-lightning/config.ini, kcli ~/.kcli/config.yml (one client per lab
host); a VM's address is read from virt-lightning's domain metadata; kcli's `list vm` table is counted;
the samples are reduced to medians and ratios.
"""

import configparser
import io
import re
import shlex
import statistics
import xml.etree.ElementTree as ET

import yaml


def libvirt_uri(address: str, key: str) -> str:
    """qemu+ssh to a lab host: the ssh client verifies its host key (the lab's block in ~/.ssh/config:
    its own known_hosts, StrictHostKeyChecking yes); no ``no_verify``."""
    return f"qemu+ssh://root@{address}/system?keyfile={key}"


def vl_config(uri: str, network_cidr: str, ssh_key_pub: str, root_password: str) -> str:
    """virt-lightning's config.ini: its libvirt, its network (made inside the lab host), the key it injects."""
    parser = configparser.ConfigParser(interpolation=None)
    parser["main"] = {"libvirt_uri": uri, "root_password": root_password, "storage_pool": "virt-lightning",
                      "network_name": "virt-lightning", "network_cidr": network_cidr, "ssh_key_file": ssh_key_pub}
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


def kcli_config(hosts: list[tuple[str, str]], key: str, network: str, pool: str = "default") -> str:
    """kcli's config.yml: one kvm client per (name, address), the first the default; each client's URL is
    ours (kcli's own for a remote host adds ``no_verify=1``: no host-key check)."""
    config = {"default": {"client": hosts[0][0], "pool": pool, "nets": [network], "numcpus": 1, "memory": 512}}
    for name, address in hosts:
        config[name] = {"type": "kvm", "host": address, "user": "root", "protocol": "ssh",
                        "url": libvirt_uri(address, key)}
    return yaml.safe_dump(config, sort_keys=False)


def vl_address(domain_xml: str) -> str | None:
    """The address virt-lightning gave a domain (its ``ipv4`` metadata, "192.168.150.5/24"), without the prefix."""
    for element in ET.fromstring(domain_xml).iter():
        if element.tag == "{ipv4}ipv4" and element.get("name"):
            return element.get("name").split("/")[0]
    return None


TABLE_ROW = re.compile(r"^\|\s*([^|\s][^|]*?)\s*\|")


def kcli_table_names(text: str) -> list[str]:
    """The first column of kcli's PrettyTable output (`kcli list vm`), header left out."""
    names = [m[1] for m in map(TABLE_ROW.match, text.splitlines()) if m]
    return names[1:] if names and names[0] == "Name" else names


def quoted(argv) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def stats(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "n": len(values)}


def summarize(samples: dict[str, list[float]], baseline: str = "cloudops") -> dict:
    """Per way: median, min, max, n and the ratio of its median to the baseline's (peer / cloudops)."""
    out = {way: stats(values) for way, values in samples.items()}
    base = out.get(baseline, {}).get("median")
    for way, s in out.items():
        s["ratio"] = round(s["median"] / base, 2) if base and s["median"] is not None else None
    return out
