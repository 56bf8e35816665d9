"""The search behind ``balance.plan``: flat cluster state and the lazy exact-greedy search.

Internal to ``cloudops.migration.balance``, which documents the model; this module is about
making the greedy search fast without changing a single choice it makes.

``State`` holds the active hosts and their VMs as flat lists indexed by number and
keeps S = sum(w*L), Q = sum(w*L^2) current, so that the objective after any single
move is O(1) (a move changes two loads). ``State.score`` is the reference scoring;
``LazyGreedy.rescore`` inlines it, operation for operation, so that both see the
same floats.

``LazyGreedy`` finds the move the exhaustive search would pick (same net, same
tie-break) without scoring every (VM, host) pair at every step:

* Candidates are (VM, host class) pairs. For one VM and one class (hosts with the
  same memory and thread count) the objective after the move only grows with the
  target's load, so the least loaded host of the class that can take the VM is the
  best target in the class: that host is scored (with any host whose load equals
  it but for float rounding), exactly as the exhaustive search would score it.
* Each candidate carries a key d = CV^2 - CV'^2 for its move. Unlike the net, d does
  not drift as the rest of the cluster changes -- exactly so when S cannot change,
  i.e. for moves within a class, and for every move when all hosts have the same
  memory per thread; otherwise ``drift_bound`` adds what other moves can have added.
  The net of a move is then at most g(d) - cost, with g(d) = CV - sqrt(CV^2 - d).
* Keys are kept in heaps, one per VM memory size (migration cost) and same/cross
  class. Later moves can only lower a key, except in two cases applied as they
  happen: VMs on the target of a move gain (their d rises by an exact amount), and
  a source that got lighter (and roomier) may become a better target than the one
  some candidates were keyed with (``opened``: those are scored or keyed again).
* When S cannot move, a candidate keyed with its class's least loaded host as target
  goes to a heap per (memory size, band of the load it adds, class) instead: when that
  host fills up, every such key falls by at least what the band's lightest VM loses,
  and ``sink`` takes that off the whole heap at once (a per-heap offset), so keys stay
  close to what they can gain rather than being lowered one by one when popped.
* A step pops the heap with the highest bound (heaps ordered in a heap of their
  bounds); a stale candidate is first lowered by what it must have lost since it was
  keyed (its host's load fell, its class's least loaded host rose: both exact for the
  d formula) and only scored if it can still win. The step ends when no bound beats
  the best fresh score. Moves off the most loaded host also lower the max term, which
  keys leave out: those candidates are checked with that bonus added.

Known limits: with more than ``MAX_CLASSES`` host sizes, hosts are pooled and the
``POOL_TARGETS`` least loaded feasible ones are scored (approximate), and a target
beyond the ``TARGET_WALK`` least loaded hosts of its class is not found. Pooled,
``balance.plan`` keys every candidate again and looks once more before stopping.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, insort
from collections import defaultdict
from collections.abc import Iterable
from heapq import heapify, heappop, heappush, heapreplace
from math import sqrt

MAX_CLASSES = 8  # more host sizes than this: pooled targets, approximate
POOL_TARGETS = 8
TARGET_WALK = 256  # hosts of a class tried for one VM before giving up on the class
BATCH = 4  # stale candidates scored per call once a best is known
SINK_BANDS = 4  # bands of a VM's weighted load per memory bucket, for ``sink``
MAX_BUCKETS = 64  # distinct VM memory sizes kept apart (else log2 bins)
RESYNC_EVERY = 1024  # moves between full recomputations of S and Q
BOUND_SLACK = 1e-9  # float error allowed for when pruning by bound
NONE = (-math.inf, -1, -1)  # (net, vm, target): no move


def cv(s: float, q: float, w: float) -> float:
    """Coefficient of variation of loads from S = sum(w*L), Q = sum(w*L^2), W = sum(w)."""
    if s <= 0:
        return 0.0
    mean = s / w
    var = q / w - mean * mean
    return sqrt(var) / mean if var > 0 else 0.0


class State:
    """Active hosts (by name order) and their VMs (by name order) as flat lists."""

    def __init__(self, cluster, memory_weight: float, cpu_weight: float, alpha: float, beta: float):
        hosts = sorted((h for h in cluster.hosts if not h.maintenance), key=lambda h: h.name)
        self.names = [h.name for h in hosts]
        index = {h.name: i for i, h in enumerate(hosts)}
        wm = memory_weight / (memory_weight + cpu_weight)
        wc = cpu_weight / (memory_weight + cpu_weight)
        self.n = n = len(hosts)
        self.km = [wm / h.memory_mb for h in hosts]  # load = km * memory + kc * cpu
        self.kc = [wc / h.vcpus for h in hosts]
        # Hosts count in proportion to their size, in the same mix as the load, so the
        # weighted mean load is the cluster's utilisation. Weights average 1 (W = n).
        mem_avg = sum(h.memory_mb for h in hosts) / n if n else 1.0
        cpu_avg = sum(h.vcpus for h in hosts) / n if n else 1.0
        self.w = [wm * h.memory_mb / mem_avg + wc * h.vcpus / cpu_avg for h in hosts]
        self.wsum = math.fsum(self.w)
        self.cap_mem = [h.memory_limit_mb for h in hosts]
        self.cap_vcpu = [h.vcpus_limit for h in hosts]
        self.tags = [h.tags for h in hosts]
        self.total_mb = sum(h.memory_mb for h in hosts)
        self.alpha, self.beta = alpha, beta
        vms = sorted((v for v in cluster.vms if v.host in index), key=lambda v: v.name)
        self.vm_names = [v.name for v in vms]
        self.vm_mem = [v.memory_mb for v in vms]
        self.vm_vcpus = [v.vcpus for v in vms]
        self.vm_cpu = [float(v.cpu_load) for v in vms]
        self.vm_group = [v.anti_affinity_group for v in vms]
        self.vm_tags = [v.required_tags or None for v in vms]
        self.vm_host = [index[v.host] for v in vms]
        self.on: list[list[int]] = [[] for _ in range(n)]  # movable (not pinned) VMs per host
        self.groups: list[dict[str, int]] = [defaultdict(int) for _ in range(n)]
        self.mem, self.vcpu, self.cpu = [0] * n, [0] * n, [0.0] * n
        for i, v in enumerate(vms):
            h = self.vm_host[i]
            self.mem[h] += v.memory_mb
            self.vcpu[h] += v.vcpus
            self.cpu[h] += self.vm_cpu[i]
            if v.anti_affinity_group is not None:
                self.groups[h][v.anti_affinity_group] += 1
            if not v.pinned:
                self.on[h].append(i)
        self.moves = 0
        self.load = [0.0] * n  # only ever updated in place: LazyGreedy holds on to it
        self.resync()

    def resync(self) -> None:
        """Recompute loads, S, Q and the objective from the per-host sums."""
        km, kc, mem, cpu, w = self.km, self.kc, self.mem, self.cpu, self.w
        self.load[:] = [km[h] * mem[h] + kc[h] * cpu[h] for h in range(self.n)]
        self.s = math.fsum(wh * x for wh, x in zip(w, self.load))
        self.q = math.fsum(wh * x * x for wh, x in zip(w, self.load))
        self.peaks = [(-x, h) for h, x in enumerate(self.load)]  # max-heap of loads, stale entries left in
        heapq.heapify(self.peaks)
        self.f = cv(self.s, self.q, self.wsum) + self.alpha * self.peak()

    def peak(self) -> float:
        """The highest load, from ``peaks`` (entries whose host's load has changed since are dropped)."""
        peaks, load = self.peaks, self.load
        while peaks and -peaks[0][0] != load[peaks[0][1]]:
            heapq.heappop(peaks)
        return -peaks[0][0] if peaks else 0.0

    def cv(self) -> float:
        return cv(self.s, self.q, self.wsum)

    def measure(self) -> tuple[float, float, float, float]:
        """(objective, CV, max load, mean load)."""
        mean = self.s / self.wsum if self.n else 0.0
        return self.f, self.cv(), max(self.load, default=0.0), mean

    def top3(self) -> list[tuple[float, int]]:
        return heapq.nlargest(3, zip(self.load, range(self.n)))

    def feasible(self, v: int, t: int) -> bool:
        """Can VM ``v`` go to host ``t``: another host, room, anti-affinity, tags."""
        if t == self.vm_host[v]:
            return False
        if self.mem[t] + self.vm_mem[v] > self.cap_mem[t] or self.vcpu[t] + self.vm_vcpus[v] > self.cap_vcpu[t]:
            return False
        group = self.vm_group[v]
        if group is not None and self.groups[t].get(group):
            return False
        tags = self.vm_tags[v]
        return tags is None or tags <= self.tags[t]

    def score(self, v: int, t: int, top: list[tuple[float, int]]) -> tuple[float, float, float]:
        """(net, objective decrease, cost) of moving VM ``v`` to host ``t``; ``top``: 3 highest loads."""
        s = self.vm_host[v]
        m, c = self.vm_mem[v], self.vm_cpu[v]
        km, kc, load, w = self.km, self.kc, self.load, self.w
        old_s = load[s]
        ls = km[s] * (self.mem[s] - m) + kc[s] * (self.cpu[s] - c)
        s_part = self.s + w[s] * (ls - old_s)
        q_part = self.q + w[s] * (ls * ls - old_s * old_s)
        cost = self.beta * m / self.total_mb
        old_t = load[t]
        lt = km[t] * (self.mem[t] + m) + kc[t] * (self.cpu[t] + c)
        new_s = s_part + w[t] * (lt - old_t)
        new_q = q_part + w[t] * (lt * lt - old_t * old_t)
        peak = ls if ls > lt else lt
        for other, h in top:
            if h != s and h != t:
                if other > peak:
                    peak = other
                break
        gain = self.f - (cv(new_s, new_q, self.wsum) + self.alpha * peak)
        return gain - cost, gain, cost

    def apply(self, v: int, t: int) -> tuple[int, float, float]:
        """Move VM ``v`` to ``t``; returns (source, old source load, old target load)."""
        s = self.vm_host[v]
        m, c, vv = self.vm_mem[v], self.vm_cpu[v], self.vm_vcpus[v]
        old_s, old_t = self.load[s], self.load[t]
        self.mem[s] -= m
        self.mem[t] += m
        self.vcpu[s] -= vv
        self.vcpu[t] += vv
        self.cpu[s] -= c
        self.cpu[t] += c
        group = self.vm_group[v]
        if group is not None:
            self.groups[s][group] -= 1
            self.groups[t][group] += 1
        self.on[s].remove(v)
        self.on[t].append(v)
        self.vm_host[v] = t
        ls = self.km[s] * self.mem[s] + self.kc[s] * self.cpu[s]
        lt = self.km[t] * self.mem[t] + self.kc[t] * self.cpu[t]
        self.load[s], self.load[t] = ls, lt
        self.moves += 1
        if self.moves % RESYNC_EVERY == 0:
            self.resync()
        else:
            w = self.w
            self.s = self.s + w[s] * (ls - old_s) + w[t] * (lt - old_t)
            self.q = self.q + w[s] * (ls * ls - old_s * old_s) + w[t] * (lt * lt - old_t * old_t)
            heapq.heappush(self.peaks, (-ls, s))
            heapq.heappush(self.peaks, (-lt, t))
            self.f = cv(self.s, self.q, self.wsum) + self.alpha * self.peak()
        return s, old_s, old_t


def exhaustive_best(st: State) -> tuple[float, int, int, int]:
    """The best (net, vm, target) over every movable VM and every host, and candidates scored."""
    top = st.top3()
    best, scored = NONE, 0
    for v in sorted(v for vms in st.on for v in vms):
        for t in range(st.n):
            if st.feasible(v, t):
                net = st.score(v, t, top)[0]
                scored += 1
                if net > best[0] or (net == best[0] and (v, t) < (best[1], best[2])):
                    best = (net, v, t)
    return best[0], best[1], best[2], scored


def drift_bound(w: float, q: float, s: float, q2: float, s2: float, dq: float, ds: float) -> float:
    """How much d = W*(Q/S^2 - (Q+x)/(S+y)^2) of any move with |x| <= dq, |y| <= ds can
    rise when the cluster goes from (q, s) to (q2, s2) through another move.

    The rise is W*(A - B(Q+x, S+y)): A is fixed, B is linear in Q+x and smooth in S+y
    over this small box, so its minimum is taken on a grid, with 10% added.
    """
    if min(s, s2) - ds <= 0:
        return math.inf  # one move can shift S by as much as S itself: no useful bound
    a = q2 / (s2 * s2) - q / (s * s)
    eq, es = q2 - q, s2 - s
    b_min = math.inf
    for y in ((-ds, 0.0, ds) if ds > 0 else (0.0,)):
        ss = s + y
        for x in (-dq, dq):
            qq = q + x
            b_min = min(b_min, (qq + eq) / ((ss + es) ** 2) - qq / (ss * ss))
    rise = w * (a - b_min)
    return 1.1 * rise if rise > 0 else 0.0


class LazyGreedy:
    """Sorted loads, host classes and lazy heaps of candidates over a ``State``."""

    def __init__(self, st: State):
        self.st = st
        n = st.n
        self.order = sorted(zip(st.load, range(n)))  # (load, host) ascending
        sizes = [(st.km[h], st.kc[h]) for h in range(n)]
        self.pooled = len(set(sizes)) > MAX_CLASSES
        if self.pooled:
            self.group_of, self.take = [0] * n, POOL_TARGETS
        else:
            index = {k: i for i, k in enumerate(sorted(set(sizes)))}
            self.group_of, self.take = [index[k] for k in sizes], 1
        self.lists: list[list[tuple[float, int]]] = [[] for _ in range(max(self.group_of) + 1)]
        for entry in self.order:
            self.lists[self.group_of[entry[1]]].append(entry)
        self.ngroups = ng = len(self.lists)
        self._buckets()
        self._drift_box()
        size = len(st.vm_names) * ng  # candidate e = vm * ng + class
        self.vm_of = [e // ng for e in range(size)]
        self.group_at = [e % ng for e in range(size)]
        self.version = [0] * size  # bumped whenever a candidate's key changes: old entries die
        self.scored_at = [-1] * size  # step of a candidate's latest exact score
        self.key = [-math.inf] * size  # d - drift of its heap when keyed
        self.src_load = [0.0] * size  # the loads of the VM's host and target behind the key
        self.dst_load = [0.0] * size
        # w * load a candidate's VM adds to a host of its class, and has on its own host
        first: dict[int, int] = {}
        for h in range(n):
            first.setdefault(self.group_of[h], h)
        wkm = [st.w[first[g]] * st.km[first[g]] for g in range(ng)]
        wkc = [st.w[first[g]] * st.kc[first[g]] for g in range(ng)]
        self.target_wload = [wkm[g] * m + wkc[g] * c for m, c in zip(st.vm_mem, st.vm_cpu) for g in range(ng)]
        self.source_wload = [st.w[h] * (st.km[h] * m + st.kc[h] * c)
                             for h, m, c in zip(st.vm_host, st.vm_mem, st.vm_cpu)]
        self._sink_kinds(size)
        self.heaps: list[list[tuple[float, int, int]]] = [[] for _ in self.kind_cost]
        self.drift = [0.0] * len(self.kind_cost)
        self.sunk = [0.0] * len(self.kind_cost)  # what ``sink`` took off each heap so far
        # per class, candidates whose target is not one of the class's two least loaded
        # hosts (those were full, or had the VM's group or lacked its tags)
        self.far: list[set[int]] = [set() for _ in range(ng)]
        self.step = 0
        self.evaluations = 0

    def _buckets(self) -> None:
        """Heaps per VM memory size (= migration cost); kind = 2 * bucket + same class."""
        st = self.st
        sizes = sorted(set(st.vm_mem))
        if len(sizes) <= MAX_BUCKETS:
            where = {m: i for i, m in enumerate(sizes)}
            self.bucket_of = [where[m] for m in st.vm_mem]
            cheapest = sizes
        else:
            self.bucket_of = [int(m).bit_length() for m in st.vm_mem]
            low: dict[int, int] = {}
            for b, m in zip(self.bucket_of, st.vm_mem):
                low[b] = min(m, low.get(b, m))
            cheapest = [low.get(b, 0) for b in range(max(self.bucket_of) + 1)]
        self.kind_cost = [st.beta * m / st.total_mb for m in cheapest for _ in (0, 1)]

    def _sink_kinds(self, size: int) -> None:
        """Heaps that follow their class's least loaded host as it fills up.

        A candidate keyed for a move to the least loaded host of its class loses
        d = 2W * b * (rise) / S^2 when that host's load rises (b: the weighted load the VM
        adds there, ``target_wload``), and the class's best target can only be that host
        or a fuller one. Such candidates go to heaps per (memory bucket, band of b,
        class), and a rise of the class's least load takes what the smallest b of the
        heap loses off the whole heap at once (``sink``), so stale keys no longer stay
        far above what they can gain until each is popped and lowered. Only when S
        cannot move (same memory per thread everywhere) and hosts are not pooled.
        """
        st, ng = self.st, self.ngroups
        self.base_kinds = nbase = len(self.kind_cost)
        self.kind_at = [0] * size  # the heap holding a candidate's live entry
        self.sunk_at = [0.0] * size  # ``sunk`` of that heap when the candidate was keyed
        self.sinking = not self.pooled and not self.heterogeneous and size > 0
        self.sink_kind: list[int] = []
        self.bucket_at = [k // 2 for k in range(nbase)]  # per heap, its VMs' memory bucket
        self.sink_of: list[list[tuple[int, float]]] = [[] for _ in range(ng)]
        if not self.sinking:
            return
        nb = nbase // 2
        tw, vm_tw = self.target_wload, self.target_wload[::ng]  # the same in every class but for rounding
        lo, hi = [math.inf] * nb, [0.0] * nb
        for b, x in zip(self.bucket_of, vm_tw):
            if x < lo[b]:
                lo[b] = x
            if x > hi[b]:
                hi[b] = x
        nk = nb * SINK_BANDS * ng
        low = [math.inf] * nk
        sink_kind = self.sink_kind
        for v, (b, x) in enumerate(zip(self.bucket_of, vm_tw)):
            if hi[b] <= lo[b]:
                band = 0
            elif lo[b] > 0:
                band = int(SINK_BANDS * math.log(x / lo[b]) / math.log(hi[b] / lo[b]))
            else:
                band = int(SINK_BANDS * (x - lo[b]) / (hi[b] - lo[b]))
            k0 = (b * SINK_BANDS + min(band, SINK_BANDS - 1)) * ng
            for g in range(ng):
                k = k0 + g
                sink_kind.append(nbase + k)
                if tw[v * ng + g] < low[k]:
                    low[k] = tw[v * ng + g]
        for k in range(nk):
            b = k // (SINK_BANDS * ng)
            self.kind_cost.append(self.kind_cost[2 * b])
            self.bucket_at.append(b)
            if low[k] < math.inf:
                self.sink_of[k % ng].append((nbase + k, low[k]))

    def sink(self, g: int, rise: float) -> None:
        """The least load of class ``g`` went up by ``rise``: lower its sinking heaps."""
        st = self.st
        s_hi = st.s + self.ds_all
        if s_hi <= 0 or rise <= 0:
            return
        f = 2.0 * st.wsum * rise / (s_hi * s_hi)
        drift, sunk = self.drift, self.sunk
        for k, b in self.sink_of[g]:
            x = f * b
            drift[k] -= x
            sunk[k] += x

    def _drift_box(self) -> None:
        """Per bucket, the most one move of its VMs can change Q and S (for ``drift_bound``)."""
        st = self.st
        nb = len(self.kind_cost) // 2
        mem_hi, cpu_hi = [0] * nb, [0.0] * nb
        for b, m, c in zip(self.bucket_of, st.vm_mem, st.vm_cpu):
            mem_hi[b], cpu_hi[b] = max(mem_hi[b], m), max(cpu_hi[b], c)
        # A move changes S by (w_t*km_t - w_s*km_s)*mem + (w_t*kc_t - w_s*kc_s)*cpu: zero
        # when all hosts have the same memory per thread, else bounded by these spreads.
        wkm = [w * k for w, k in zip(st.w, st.km)]
        wkc = [w * k for w, k in zip(st.w, st.kc)]
        km_spread, kc_spread = max(wkm) - min(wkm), max(wkc) - min(wkc)
        self.heterogeneous = km_spread > 1e-12 * max(wkm) or kc_spread > 1e-12 * max(wkc)
        self.max_add = [max(st.km) * m + max(st.kc) * c for m, c in zip(mem_hi, cpu_hi)]
        self.ds_hi = [km_spread * m + kc_spread * c for m, c in zip(mem_hi, cpu_hi)]
        self.ds_all = max(self.ds_hi, default=0.0)
        self.w_hi = max(st.w)

    def top(self) -> list[tuple[float, int]]:
        """The three highest (load, host), highest first."""
        return self.order[:-4:-1]

    def refresh(self) -> None:
        """Key every candidate afresh (at the start, and, pooled, before concluding that nothing is left)."""
        self.heaps = [[] for _ in self.kind_cost]
        self.drift = [0.0] * len(self.kind_cost)
        self.sunk = [0.0] * len(self.kind_cost)
        ng = self.ngroups
        if self.pooled:  # hosts of many sizes share one list: its head bounds nothing
            self.rescore([v * ng + g for vms in self.st.on for v in vms for g in range(ng)], self.top())
        else:
            self.seed(range(ng))
        for heap in self.heaps:
            heapify(heap)

    def seed(self, classes: Iterable[int]) -> None:
        """Key every candidate into ``classes`` for a move to the least loaded host of the
        class, feasible or not: a feasible one is no less loaded, so the key is a bound,
        and the candidate is scored (feasibility included) when it comes near the top."""
        st, ng, heaps = self.st, self.ngroups, self.heaps
        wsum, w, s0, q0, load, km, kc, mem, cpu = st.wsum, st.w, st.s, st.q, st.load, st.km, st.kc, st.mem, st.cpu
        ratio0 = wsum * q0 / (s0 * s0) if s0 > 0 else 0.0  # CV^2 + 1
        classes = list(classes)
        # per class: its least loaded host, then (load, host, km, kc, memory, cpu, w) of that
        # host and of the next one (the target of the VMs on the first)
        heads = []
        for g in classes:
            self.far[g].clear()
            two = [(x, t, km[t], kc[t], mem[t], cpu[t], w[t]) for x, t in self.lists[g][:2]]
            heads.append((g, two[0][1], two[0], two[1] if len(two) > 1 else None))
        version, scored_at, keys = self.version, self.scored_at, self.key
        src_load, dst_load, bucket_of, group_of = self.src_load, self.dst_load, self.bucket_of, self.group_of
        drift, sunk, kind_at, sunk_at, sink_kind = self.drift, self.sunk, self.kind_at, self.sunk_at, self.sink_kind
        sinking = self.sinking
        vm_mem, vm_cpu = st.vm_mem, st.vm_cpu
        for h, vms in enumerate(st.on):
            old_s, w_s, km_s, kc_s = load[h], w[h], km[h], kc[h]
            for v in vms:
                m, c = vm_mem[v], vm_cpu[v]
                ls = km_s * (mem[h] - m) + kc_s * (cpu[h] - c)
                s_part = s0 + w_s * (ls - old_s)
                q_part = q0 + w_s * (ls * ls - old_s * old_s)
                for g, h0, first_head, second in heads:
                    e = v * ng + g
                    version[e] += 1
                    scored_at[e] = -1
                    first = h0 != h
                    head = first_head if first else second
                    if head is None:
                        keys[e] = -math.inf
                        continue
                    old_t, t, km_t, kc_t, mem_t, cpu_t, w_t = head
                    lt = km_t * (mem_t + m) + kc_t * (cpu_t + c)
                    new_s = s_part + w_t * (lt - old_t)
                    new_q = q_part + w_t * (lt * lt - old_t * old_t)
                    d = ratio0 - (wsum * new_q / (new_s * new_s) if new_s > 0 else 0.0)
                    k = sink_kind[e] if sinking and first else 2 * bucket_of[v] + (group_of[h] == g)
                    kind_at[e] = k
                    sunk_at[e] = sunk[k]
                    keys[e] = d - drift[k]
                    src_load[e], dst_load[e] = old_s, old_t
                    heaps[k].append((-keys[e], e, version[e]))

    def best_move(self) -> tuple[float, int, int]:
        """The best (net, vm, target) now -- the exhaustive search's pick -- or NONE."""
        self.step += 1
        st, step, heaps, scored_at, top = self.st, self.step, self.heaps, self.scored_at, self.top()
        cv0 = st.cv()
        cv0_sq = cv0 * cv0
        best = NONE
        version, key, drift, costs = self.version, self.key, self.drift, self.kind_cost
        bounds = []  # (-self.bound, heap) of each non-empty heap, inlined; a heap itself
        for k, heap in enumerate(heaps):
            while heap and heap[0][2] != version[heap[0][1]]:
                heappop(heap)
            if heap:
                d = drift[k] - heap[0][0]
                bounds.append((costs[k] - (cv0 - sqrt(cv0_sq - d) if d < cv0_sq else cv0), k))
        heapify(bounds)
        load, vm_host, src_load, dst_load = st.load, st.vm_host, self.src_load, self.dst_load
        vm_of, group_at, target_wload, source_wload = self.vm_of, self.group_at, self.target_wload, self.source_wload
        sunk, sunk_at = self.sunk, self.sunk_at
        heads = [entries[0][0] for entries in self.lists]
        rekey = not self.pooled
        s_hi = st.s + self.ds_all
        factor = 2.0 * st.wsum / (s_hi * s_hi) if s_hi > 0 else 0.0
        aside: list[tuple[int, tuple[float, int, int]]] = []
        while bounds:
            pick_bound, pick = bounds[0]
            bar = best[0] - BOUND_SLACK
            if -pick_bound < bar:
                break
            heap, batch = heaps[pick], []
            base, cost, sunk_now = drift[pick], costs[pick], sunk[pick]
            # bound >= bar  <=>  cv0 - sqrt(cv0^2 - d) >= bar + cost  <=>  d >= d_bar
            reach = cv0 - (bar + cost)
            d_bar = cv0_sq - reach * reach if reach >= 0 else math.inf
            limit = BATCH if best[1] >= 0 else 1
            while heap and len(batch) < limit:
                negkey, e, ver = heap[0]
                if ver != version[e]:
                    heappop(heap)
                    continue
                d = base - negkey
                if d < d_bar:
                    break
                if scored_at[e] == step:
                    aside.append((pick, heappop(heap)))  # fresh: already counted in ``best``
                    continue
                if rekey:
                    # Lower the key by what it must have lost since: its host's load can
                    # only have fallen (rises are applied in ``moved``) and no host of its
                    # class is below the least loaded one, so d fell by at least
                    # 2W * (w_s * a * host drop + w_c * b * target rise) / S'^2, of
                    # which ``sink`` may have taken some already.
                    v = vm_of[e]
                    h = vm_host[v]
                    drop = src_load[e] - load[h]
                    head = heads[group_at[e]]
                    rise = head - dst_load[e]
                    loss = source_wload[v] * drop if drop > 0 else 0.0
                    if rise > 0:
                        loss += target_wload[e] * rise
                    loss = factor * loss - (sunk_now - sunk_at[e])
                    if loss > 0:
                        d -= loss
                        if d < d_bar:  # re-filed in place: the entry stays the live one
                            key[e] = d - base
                            sunk_at[e] = sunk_now
                            if drop > 0:
                                src_load[e] = load[h]
                            if rise > 0:
                                dst_load[e] = head
                            heapreplace(heap, (base - d, e, ver))
                            continue
                heappop(heap)
                batch.append(e)
            if batch:
                best = self.rescore(batch, top, best)
            pick_bound = self.bound(pick, cv0, cv0_sq)
            if pick_bound == -math.inf:
                heappop(bounds)
            else:
                heapreplace(bounds, (-pick_bound, pick))
        for k, entry in aside:
            heappush(heaps[k], entry)
        return self.peak_candidates(top, cv0, best)

    def peak_candidates(self, top: list, cv0: float, best: tuple) -> tuple[float, int, int]:
        """Moves off the most loaded host also lower the max term, by at most
        alpha * min(a, M - M2), which keys leave out: check them with it added."""
        st, step, ng, key, drift, costs = self.st, self.step, self.ngroups, self.key, self.drift, self.kind_cost
        cv0_sq = cv0 * cv0
        gap, h = top[0][0] - top[1][0], top[0][1]
        km_h, kc_h, alpha = st.km[h], st.kc[h], st.alpha
        bar = best[0] - BOUND_SLACK
        needs = []  # per memory bucket (cost), the d a candidate needs even with the largest bonus
        for cost in costs[:self.base_kinds:2]:
            reach = cv0 - (bar + cost - alpha * gap)
            needs.append(cv0_sq - reach * reach if reach >= 0 else math.inf)
        bucket_at = self.bucket_at
        batch = []
        kind_at = self.kind_at
        for v in st.on[h]:
            bonus = -1.0
            for e in range(v * ng, v * ng + ng):
                k = kind_at[e]
                d = key[e] + drift[k]
                if d < needs[bucket_at[k]] or self.scored_at[e] == step:
                    continue
                if bonus < 0:
                    bonus = alpha * min(km_h * st.vm_mem[v] + kc_h * st.vm_cpu[v], gap)
                gain = cv0 - sqrt(cv0_sq - d) if d < cv0_sq else cv0
                if gain - costs[k] + bonus >= bar:
                    batch.append(e)
        return self.rescore(batch, top, best) if batch else best

    def bound(self, k: int, cv0: float, cv0_sq: float) -> float:
        """Upper bound on the net of any candidate in heap ``k`` (dead entries on top dropped)."""
        heap, version = self.heaps[k], self.version
        while heap and heap[0][2] != version[heap[0][1]]:
            heappop(heap)
        if not heap:
            return -math.inf
        d = self.drift[k] - heap[0][0]
        return (cv0 - sqrt(cv0_sq - d) if d < cv0_sq else cv0) - self.kind_cost[k]

    def moved(self, v: int, s: int, old_s: float, t: int, old_t: float) -> None:
        """Bring the search up to date after VM ``v`` went from ``s`` to ``t``."""
        st, ng = self.st, self.ngroups
        g_t = self.group_of[t]
        least = self.lists[g_t][0][0]
        self.refile(s, old_s)
        self.refile(t, old_t)
        if self.sinking:
            self.sink(g_t, self.lists[g_t][0][0] - least)
        top = self.top()
        if self.heterogeneous:  # S moves, and d with it: widen every heap's allowance
            w = st.w
            s_old = st.s - (w[s] * (st.load[s] - old_s) + w[t] * (st.load[t] - old_t))
            q_old = st.q - (w[s] * (st.load[s] ** 2 - old_s ** 2) + w[t] * (st.load[t] ** 2 - old_t ** 2))
            peak = top[0][0]
            for b, (add, ds) in enumerate(zip(self.max_add, self.ds_hi)):
                dq = self.w_hi * (2.0 * add * peak + add * add)
                self.drift[2 * b] += drift_bound(st.wsum, q_old, s_old, st.q, st.s, dq, ds)
                self.drift[2 * b + 1] += drift_bound(st.wsum, q_old, s_old, st.q, st.s, dq, 0.0)
        self.opened(s, top)
        # The VMs left on t would now take load off a fuller host: their d rises by at
        # most 2 * W * w_t * a * (t's load increase) / S'^2.
        s_lo = st.s - self.ds_all
        km_t, kc_t, vm_mem, vm_cpu = st.km[t], st.kc[t], st.vm_mem, st.vm_cpu
        if s_lo <= 0:  # no useful bound: score them
            self.source_wload[v] = st.w[t] * (km_t * vm_mem[v] + kc_t * vm_cpu[v])
            self.rescore([u * ng + g for u in st.on[t] for g in range(ng)], top)
            return
        rise = 2.0 * st.wsum * st.w[t] * (st.load[t] - old_t) / (s_lo * s_lo)
        heaps, version, key, src_load, load_t = self.heaps, self.version, self.key, self.src_load, st.load[t]
        kind_at = self.kind_at
        for u in st.on[t]:
            if u == v:
                continue
            up = rise * (km_t * vm_mem[u] + kc_t * vm_cpu[u])
            for e in range(u * ng, u * ng + ng):
                if key[e] > -math.inf:
                    version[e] += 1
                    key[e] += up
                    src_load[e] = load_t
                    heappush(heaps[kind_at[e]], (-key[e], e, version[e]))
        self.source_wload[v] = st.w[t] * (km_t * vm_mem[v] + kc_t * vm_cpu[v])
        self.rescore(range(v * ng, v * ng + ng), top)

    def opened(self, s: int, top: list) -> None:
        """Source ``s`` is lighter and has more room: it may now be a better target than
        the one some candidates of its class were keyed with. Those are the whole class
        if s is now its least loaded host; the VMs on that host if s is second; and any
        candidate whose target was further up than s is now."""
        st, ng = self.st, self.ngroups
        g = self.group_of[s]
        entries, new = self.lists[g], st.load[s]
        position = bisect_left(entries, (new, s))
        if position == 0:
            if self.pooled:
                self.rescore([u * ng + g for vms in st.on for u in vms], top)
            else:
                self.seed((g,))
                for heap in self.heaps:
                    heapify(heap)
            return
        stale = [e for e in self.far[g] if self.dst_load[e] > new]
        if position == 1:
            stale += [u * ng + g for u in st.on[entries[0][1]]]
        if stale:
            self.rescore(stale, top)

    def refile(self, h: int, old: float) -> None:
        """Host ``h``'s load changed from ``old``: re-file it in the sorted lists."""
        new = self.st.load[h]
        for sorted_list in (self.order, self.lists[self.group_of[h]]):
            del sorted_list[bisect_left(sorted_list, (old, h))]
            insort(sorted_list, (new, h))

    def rescore(self, candidates: Iterable[int], top: list, best: tuple = NONE) -> tuple[float, int, int]:
        """Score ``candidates`` exactly and push their new keys; the best of ``best`` and them.

        Inlines State.feasible and State.score: same arithmetic, same floats.
        """
        st = self.st
        wsum, w, f0, s0, q0 = st.wsum, st.w, st.f, st.s, st.q
        load, km, kc, mem, cpu, vcpu = st.load, st.km, st.kc, st.mem, st.cpu, st.vcpu
        cap_mem, cap_vcpu, groups, host_tags = st.cap_mem, st.cap_vcpu, st.groups, st.tags
        vm_mem, vm_cpu, vm_vcpus, vm_group, vm_tags = st.vm_mem, st.vm_cpu, st.vm_vcpus, st.vm_group, st.vm_tags
        vm_host, alpha, beta, total_mb = st.vm_host, st.alpha, st.beta, st.total_mb
        take, lists, heaps, bucket_of, group_of = self.take, self.lists, self.heaps, self.bucket_of, self.group_of
        vm_of, group_at, pooled = self.vm_of, self.group_at, self.pooled
        version, scored_at, keys, step, drift = self.version, self.scored_at, self.key, self.step, self.drift
        src_load, dst_load, far = self.src_load, self.dst_load, self.far
        kind_at, sunk_at, sunk, sink_kind, sinking = self.kind_at, self.sunk_at, self.sunk, self.sink_kind, self.sinking
        cv0 = cv(s0, q0, wsum)
        cv0_sq = cv0 * cv0
        ninf = -math.inf
        best_net, best_v, best_t = best
        (top0, top0_h), (top1, top1_h) = top[0], top[1]
        top2 = top[2][0] if len(top) > 2 else ninf
        evaluations = 0
        for e in candidates:
            v, g = vm_of[e], group_at[e]
            s = vm_host[v]
            # the highest load on a host other than s (r1, on h1) and the next one (r2)
            if s == top0_h:
                r1, h1, r2 = top1, top1_h, top2
            elif s == top1_h:
                r1, h1, r2 = top0, top0_h, top2
            else:
                r1, h1, r2 = top0, top0_h, top1
            m, c, vv, group, tags = vm_mem[v], vm_cpu[v], vm_vcpus[v], vm_group[v], vm_tags[v]
            old_s, w_s = load[s], w[s]
            ls = km[s] * (mem[s] - m) + kc[s] * (cpu[s] - c)
            s_part = s0 + w_s * (ls - old_s)
            q_part = q0 + w_s * (ls * ls - old_s * old_s)
            cost = beta * m / total_mb
            vm_net, vm_t, vm_cv, cv_load, cv_at = ninf, -1, math.inf, 0.0, 0
            found = walked = 0
            tie = math.inf
            for old_t, t in lists[g]:
                # after ``take`` targets, go on only through float ties with the last one:
                # equal loads summed in another order may differ in the last bit
                if (found >= take and old_t > tie) or walked >= TARGET_WALK:
                    break
                walked += 1
                if (t == s or mem[t] + m > cap_mem[t] or vcpu[t] + vv > cap_vcpu[t]
                        or (group is not None and groups[t].get(group))
                        or (tags is not None and not tags <= host_tags[t])):
                    continue
                lt = km[t] * (mem[t] + m) + kc[t] * (cpu[t] + c)
                w_t = w[t]
                new_s = s_part + w_t * (lt - old_t)
                new_q = q_part + w_t * (lt * lt - old_t * old_t)
                peak = ls if ls > lt else lt
                other = r1 if h1 != t else r2
                if other > peak:
                    peak = other
                if new_s <= 0:
                    cv1 = 0.0
                else:
                    mean = new_s / wsum
                    var = new_q / wsum - mean * mean
                    cv1 = sqrt(var) / mean if var > 0 else 0.0
                net = (f0 - (cv1 + alpha * peak)) - cost
                evaluations += 1
                if cv1 < vm_cv:
                    vm_cv, cv_load, cv_at = cv1, old_t, walked
                if net > vm_net or (net == vm_net and t < vm_t):
                    vm_net, vm_t = net, t
                found += 1
                if found == take:
                    tie = old_t + 1e-12 * (1.0 + old_t)
            version[e] += 1
            scored_at[e] = step
            if vm_t < 0 or cv_at > 2:
                far[g].add(e)  # no target, or past the two least loaded: watch for hosts opening
            else:
                far[g].discard(e)
            if vm_t < 0:
                keys[e] = ninf
                dst_load[e] = math.inf
                continue
            # keyed with the class's least loaded host: the key can follow it (``sink``)
            k = sink_kind[e] if sinking and cv_at == 1 else 2 * bucket_of[v] + (not pooled and group_of[s] == g)
            kind_at[e] = k
            sunk_at[e] = sunk[k]
            keys[e] = (cv0_sq - vm_cv * vm_cv) - drift[k]
            src_load[e], dst_load[e] = old_s, cv_load
            heappush(heaps[k], (-keys[e], e, version[e]))
            if vm_net > best_net or (vm_net == best_net and (v, vm_t) < (best_v, best_t)):
                best_net, best_v, best_t = vm_net, v, vm_t
        self.evaluations += evaluations
        return best_net, best_v, best_t
