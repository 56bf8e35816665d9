"""``state.import``: move the cloud state of an older cloudops (JSON files under ``var/``) into a store.

Before the state store, one control machine kept the cloud's state in files of its state
directory. ``read_legacy(directory)`` turns them into the store's keys and values; ``apply``
writes each key only where the store has none (create), so running it twice changes nothing,
and a key the store already holds with other content is a conflict, reported and left alone.

    cloud/ipam/<network>.json    -> ipam/<network>
    cloud/maintenance.json       -> maintenance/<host>
    images/catalog.json          -> images/catalog (merged: ids the store lacks are added)
    cloud/known_hosts            -> hostkeys/<vm>
    cloud/migrating/<vm>.json    -> migrating/<vm>
    cloud/migrations.jsonl       -> migrations/<time>-<vm>
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from cloudops.errors import CloudopsError
from cloudops.state.store import Store, check_key


@dataclass
class ImportReport:
    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"added": self.added, "unchanged": self.unchanged, "conflicts": self.conflicts}


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CloudopsError(f"cannot import {path}: {exc}") from None


def read_legacy(directory) -> dict[str, dict]:
    """key -> value for every piece of old-style state under ``directory`` (missing files: nothing)."""
    root = Path(directory)
    if not root.is_dir():
        raise CloudopsError(f"state.import: {root} is not a directory")
    found: dict[str, dict] = {}
    for path in sorted((root / "cloud" / "ipam").glob("*.json")):
        doc = _json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("allocations"), dict):
            raise CloudopsError(f"cannot import {path}: not an IPAM allocation file")
        found[f"ipam/{path.stem}"] = doc
    maintenance = root / "cloud" / "maintenance.json"
    if maintenance.exists():
        for host, on in (_json(maintenance) or {}).items():
            if on:
                found[f"maintenance/{host}"] = {"on": True, "by": "state.import", "at": maintenance.stat().st_mtime}
    catalog = root / "images" / "catalog.json"
    if catalog.exists():
        data = _json(catalog)
        if not isinstance(data, dict) or not all(isinstance(v, dict) and v.get("id") == k for k, v in data.items()):
            raise CloudopsError(f"cannot import {catalog}: not an image catalog")
        found["images/catalog"] = data
    known_hosts = root / "cloud" / "known_hosts"
    if known_hosts.exists():
        for line in known_hosts.read_text().splitlines():
            parts = line.split()
            if len(parts) < 3 or "," not in parts[0]:
                continue
            name, ip = parts[0].split(",", 1)
            entry = found.setdefault(f"hostkeys/{name}", {"ip": ip, "keys": []})
            entry["keys"].append([parts[1], parts[2]])
    for path in sorted((root / "cloud" / "migrating").glob("*.json")):
        found[f"migrating/{path.stem}"] = _json(path)
    history = root / "cloud" / "migrations.jsonl"
    if history.exists():
        for number, line in enumerate(history.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                found[f"migrations/{float(record['time']):.3f}-{record['name']}"] = record
            except (ValueError, KeyError, TypeError):
                raise CloudopsError(f"cannot import {history} line {number}: not a migration record") from None
    for key in found:
        check_key(key)
    return found


def apply(store: Store, found: dict[str, dict], dry_run: bool = False) -> ImportReport:
    report = ImportReport()
    for key, value in sorted(found.items()):
        if key == "images/catalog":
            _merge_catalog(store, value, report, dry_run)
            continue
        entry = store.get(key)
        if entry is not None:
            (report.unchanged if entry.value == value else report.conflicts).append(key)
        elif dry_run or store.create(key, value):
            report.added.append(key)
        else:
            report.conflicts.append(key)  # created by someone else in between
    return report


def _merge_catalog(store: Store, images: dict, report: ImportReport, dry_run: bool) -> None:
    current = store.value("images/catalog", {})
    names = {v.get("name"): k for k, v in current.items()}
    for image_id, fields in sorted(images.items()):
        label = f"images/catalog {fields.get('name')} ({image_id[:12]})"
        if image_id in current:
            report.unchanged.append(label)
        elif names.get(fields.get("name"), image_id) != image_id:
            report.conflicts.append(f"{label}: the name is taken by {names[fields.get('name')][:12]}")
        else:
            report.added.append(label)
    if not dry_run:
        added = {i: {**f, "hosts": f.get("hosts", [])} for i, f in images.items()
                 if i not in current and names.get(f.get("name"), i) == i}
        store.update("images/catalog", lambda data: data.update({k: v for k, v in added.items() if k not in data}))
