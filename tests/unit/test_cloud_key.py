"""The cloud's own SSH key: made once, never left without its public half."""


def test_the_cloud_key_is_made_with_its_public_half_and_a_lost_public_half_is_derived_again(tmp_path, monkeypatch):
    import subprocess

    from cloudops import paths
    from cloudops.compute import guest

    monkeypatch.setattr(paths, "var_dir", lambda: tmp_path)
    key = guest.cloud_key()
    public = key.with_name("id_ed25519.pub")
    assert key.exists() and public.exists() and oct(key.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in key.parent.iterdir()) == ["id_ed25519", "id_ed25519.lock", "id_ed25519.pub"]
    want = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True,
                          check=True).stdout.split()[:2]
    public.unlink()  # as a crash between ssh-keygen's two writes would leave it
    assert guest.cloud_key() == key
    assert public.read_text().split()[:2] == want
