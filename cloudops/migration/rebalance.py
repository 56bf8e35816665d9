"""Even out the cloud: plan with ``balance.plan`` on the live model; apply one migration at a time.

A dry run plans every move on one measurement and reports the imbalance before and
after the plan. Applying measures the cloud again before each move (CPU load changes,
migrations take time), takes the planner's single best move, migrates that VM, and
stops when no move clears the margin, at ``max_moves``, or at the first failure.
"""

from dataclasses import asdict, dataclass, field

from cloudops.errors import CloudopsError
from cloudops.migration import balance, cluster, migrate


@dataclass
class Report:
    applied: bool
    before: dict
    after: dict
    moves: list[dict] = field(default_factory=list)
    stopped: str = ""
    failed: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"{m['vm']:<20} {m['source']} -> {m['target']:<8} {m.get('status', 'planned'):<8} "
               f"gain {m['improvement']:.4f} cost {m['cost']:.4f}" for m in self.moves]
        verb = "moved" if self.applied else "planned"
        out.append(f"imbalance {self.before['objective']:.4f} (CV {self.before['cv']:.3f}, max load "
                   f"{self.before['max_load']:.3f}) -> {self.after['objective']:.4f} (CV {self.after['cv']:.3f}, "
                   f"max load {self.after['max_load']:.3f}); {len(self.moves)} migration(s) {verb}; {self.stopped}")
        if self.failed:
            out.append(f"stopped by a failure: {self.failed}")
        return out


def rebalance(inventory, *, apply: bool = False, max_moves: int | None = None, margin: float = 0.0,
              target_cv: float = balance.DEFAULT_TARGET_CV, cpu_interval: float = 1.0,
              objective: balance.Objective = balance.Objective(), policy=None, progress=None,
              message=lambda m: None) -> Report:
    """Plan (and with ``apply``, carry out) migrations that reduce the imbalance of memory and CPU load."""
    hosts = inventory.hypervisors()
    message(f"measuring {len(hosts)} hosts")
    model = cluster.model(hosts, cpu_interval)
    knobs = dict(margin=margin, target_cv=target_cv, objective=objective)
    if not apply:
        plan = balance.plan(model, max_moves=max_moves, **knobs)
        return Report(False, asdict(plan.before), asdict(plan.after), [_move(m) for m in plan.moves], plan.stopped)
    before = balance.imbalance(model, objective)
    report = Report(True, asdict(before), asdict(before))
    limit = max_moves if max_moves is not None else 2 * max(len(model.vms), 1)
    while True:
        if len(report.moves) >= limit:
            report.stopped = "max_moves reached"
            break
        move = balance.next_move(model, **knobs)
        if move is None:
            report.stopped = balance.plan(model, max_moves=1, **knobs).stopped
            break
        message(f"move {len(report.moves) + 1}: {move.vm} {move.source} -> {move.target} "
                f"(gain {move.improvement:.4f}, cost {move.cost:.4f})")
        try:
            result = migrate.migrate_vm(move.vm, move.target, inventory, policy=policy, progress=progress,
                                        message=message)
        except CloudopsError as exc:
            report.moves.append({**_move(move), "status": "failed", "error": str(exc)})
            report.failed = str(exc)
            report.stopped = "a migration failed"
            break
        report.moves.append({**_move(move), "status": "moved", "result": result.to_dict()})
        message("measuring again")
        model = cluster.model(hosts, cpu_interval)
    report.after = asdict(balance.imbalance(model, objective))
    return report


def _move(m: balance.Move) -> dict:
    return {"vm": m.vm, "source": m.source, "target": m.target, "memory_mb": m.memory_mb,
            "improvement": m.improvement, "cost": m.cost}
