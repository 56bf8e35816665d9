"""The tiny image's seed-apply script, run for real (busybox sh) on a minimal guest root in a temp directory."""

import subprocess

from cloudops.templating import render


def guest_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "root").mkdir()
    (root / "etc/passwd").write_text(render("image/tiny/etc/passwd.j2"))
    (root / "etc/shadow").write_text(render("image/tiny/etc/shadow.j2", days=19000))
    (root / "etc/hosts").write_text(render("image/tiny/etc/hosts.j2", hostname="tiny"))
    (root / "etc/hostname").write_text("tiny\n")
    return root


def seed_apply(tmp_path, files: dict, root) -> subprocess.CompletedProcess:
    """Write ``files`` (name -> text) as the seed, replacing an earlier one, and apply it to ``root``."""
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir(exist_ok=True)
    for old in seed_dir.iterdir():
        old.unlink()
    for name, text in files.items():
        (seed_dir / name).write_text(text)
    script = tmp_path / "seed-apply"
    script.write_text(render("image/tiny/seed-apply.j2"))
    return subprocess.run(["busybox", "sh", str(script), str(seed_dir), str(root)], capture_output=True, text=True,
                          check=False)
