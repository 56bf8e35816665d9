"""Hypervisor hosts as the cloud manages them: idempotent ``deploy`` and ``maintenance`` flags."""
