"""Per-step cost model of a strategy: measured seconds and exact MACs per (cache depth, prune ratio).

A UNet call's cost depends only on its cache depth and prune ratio (for a given model, latent size, batch,
device, dtype and thread count), so a run's sampling time is the sum of its calls' entries, the calls being
`Strategy.call_plan`. The table is measured once, interleaved over repeats, and stored as JSON keyed by what
it depends on; the search and the benchmark share it. It times the patch as a user of `datosd` does: through
the returned state's methods. Every entry runs once untimed before it is timed (the first call of each shape
and dtype pays one-off costs: kernel selection, allocations, weight casts). Each entry keeps its raw repeats,
so a disturbed measurement shows as a large spread ((max - min) / median), and, even with one repeat, as
times out of line with the entries' MACs (`CostTable.mac_mismatches`).
"""
import hashlib
import json
import platform
import random
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from datosd.patch import apply_patch, remove_patch
from datosd.strategy import MAX_DEPTH, Strategy
from datosd.utils import find_unet

from .runtime import precision_name, precision_scope
from .samplers import first_step_calls

SEARCH_DEPTHS = (0, 1, 12)  # spec 1
SEARCH_RATIOS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)  # spec 1, plus "no pruning"
MAC_TOLERANCE = 1.5  # how far an entry pair's time ratio may stray from its MAC ratio (`CostTable.mac_mismatches`)


def entry_name(depth: int, ratio: float) -> str:
    """Table key of a call: 'd0' (nothing runs, the ratio is moot) or e.g. 'd12_r0.50'."""
    depth = min(int(depth), MAX_DEPTH)
    return "d0" if depth == 0 else f"d{depth}_r{ratio:.2f}"


def config_hash(unet: torch.nn.Module) -> str:
    """Hash of the UNet's architecture (parameter names and shapes), not of its weights."""
    digest = hashlib.sha256()
    for name, param in unet.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)};".encode())
    return digest.hexdigest()[:16]


def context_width(unet: torch.nn.Module) -> int:
    for module in unet.modules():
        if type(module).__name__ == "CrossAttention" and module.to_k.in_features != module.to_q.in_features:
            return module.to_k.in_features
    for module in unet.modules():
        if type(module).__name__ == "CrossAttention":
            return module.to_k.in_features
    raise ValueError("the UNet has no cross-attention layer")


def spread(values: Sequence[float]) -> float:
    """(max - min) / median of repeated measurements; 0 for fewer than two."""
    if len(values) < 2:
        return 0.0
    median = statistics.median(values)
    return (max(values) - min(values)) / median if median > 0 else float("inf")


CallPlan = Sequence[Tuple[int, float]]  # (cache depth, prune ratio) of every UNet call of a run


@dataclass
class CostTable:
    """Seconds (median over repeats) and MACs of one UNet call per table entry, for one setting `key`."""

    key: Dict[str, object]
    seconds: Dict[str, float] = field(default_factory=dict)
    raw_seconds: Dict[str, List[float]] = field(default_factory=dict)
    macs: Dict[str, int] = field(default_factory=dict)

    def call_seconds(self, depth: int, ratio: float) -> float:
        name = entry_name(depth, ratio)
        if name not in self.seconds:
            raise KeyError(f"the cost table has no entry {name}; measure it (entries: {sorted(self.seconds)})")
        return self.seconds[name]

    def plan_seconds(self, plan: CallPlan) -> float:
        """Predicted UNet time (seconds) of a run making the calls `plan`: the sum of their entries."""
        return sum(self.call_seconds(d, r) for d, r in plan)

    def plan_macs(self, plan: CallPlan) -> int:
        """Exact MACs of a run making the calls `plan`."""
        missing = [entry_name(d, r) for d, r in plan if entry_name(d, r) not in self.macs]
        if missing:
            raise KeyError(f"the cost table has no MAC count for {sorted(set(missing))}")
        return sum(self.macs[entry_name(d, r)] for d, r in plan)

    def predict(self, strategy: Strategy, sampler: str = "plms", n_blocks: int = MAX_DEPTH) -> float:
        """Predicted UNet time of one sampling run of `strategy` under `sampler` (seconds) on a UNet of
        `n_blocks` input blocks."""
        return self.plan_seconds(strategy.call_plan(first_step_calls(sampler), n_blocks))

    def predict_macs(self, strategy: Strategy, sampler: str = "plms", n_blocks: int = MAX_DEPTH) -> int:
        """Exact MACs of one sampling run's UNet calls."""
        return self.plan_macs(strategy.call_plan(first_step_calls(sampler), n_blocks))

    def spread(self, name: str) -> float:
        """`spread` of an entry's repeats: large when the machine was disturbed while it was measured."""
        return spread(self.raw_seconds.get(name, []))

    def noisy_entries(self, threshold: float, names: Optional[Iterable[str]] = None) -> Dict[str, float]:
        """{entry: spread} of the entries (all, or `names`) whose repeats spread more than `threshold`."""
        names = sorted(self.raw_seconds) if names is None else names
        return {name: self.spread(name) for name in names if self.spread(name) > threshold}

    def mac_mismatches(self, tolerance: float = MAC_TOLERANCE, names: Optional[Iterable[str]] = None
                       ) -> List[Tuple[str, str, float, float]]:
        """The pairs of entries (all, or among `names`) whose times are out of line with their MACs: a cold or
        disturbed measurement that one repeat's spread cannot show. (bigger, smaller, time ratio, MAC ratio) for
        every pair, `bigger` having more MACs, where the bigger call took more than `tolerance` x the MAC ratio
        of the smaller one's time (a bigger call is not that much less efficient per MAC) or less than
        1 / `tolerance` of it (nor clearly faster). Entries without seconds or MACs, or of no MACs (d0), are not
        compared."""
        names = sorted(self.seconds) if names is None else sorted(names)
        sized = sorted(((self.macs[n], self.seconds[n], n) for n in names
                        if self.macs.get(n, 0) > 0 and self.seconds.get(n, 0) > 0), key=lambda e: (-e[0], e[2]))
        mismatches = []
        for i, (big_macs, big_seconds, big) in enumerate(sized):
            for small_macs, small_seconds, small in sized[i + 1:]:
                time_ratio, mac_ratio = big_seconds / small_seconds, big_macs / small_macs
                if time_ratio > tolerance * mac_ratio or time_ratio < 1 / tolerance:
                    mismatches.append((big, small, time_ratio, mac_ratio))
        return mismatches

    def merged_into(self, stored: Optional["CostTable"]) -> "CostTable":
        """`stored` (same key) with this table's entries added; this table's entries replace stored ones of
        the same name, the stored table's other entries stay."""
        if stored is None:
            return self
        if stored.key != self.key:
            raise ValueError("merging cost tables of different keys")
        return CostTable(key=self.key, seconds={**stored.seconds, **self.seconds},
                         raw_seconds={**stored.raw_seconds, **self.raw_seconds}, macs={**stored.macs, **self.macs})

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, object]) -> "CostTable":
        return cls(key=dict(data["key"]), seconds=dict(data.get("seconds", {})),
                   raw_seconds={k: list(v) for k, v in data.get("raw_seconds", {}).items()},
                   macs={k: int(v) for k, v in data.get("macs", {}).items()})

    def save(self, path: Path) -> None:
        """Store in a JSON file holding a list of tables, merged into a stored table with the same key (this
        table's entries replace stored entries of the same name; the stored table's other entries stay)."""
        path = Path(path)
        tables = load_tables(path) if path.exists() else []
        stored = next((t for t in tables if t.key == self.key), None)
        tables = [t for t in tables if t.key != self.key] + [self.merged_into(stored)]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps([t.to_dict() for t in tables], indent=1))
        tmp.replace(path)


def load_tables(path: Path) -> List[CostTable]:
    return [CostTable.from_dict(d) for d in json.loads(Path(path).read_text())]


def find_table(path: Path, key: Dict[str, object]) -> Optional[CostTable]:
    """The stored table whose key equals `key`, if any."""
    if not Path(path).exists():
        return None
    for table in load_tables(path):
        if table.key == key:
            return table
    return None


def hardware_name(device) -> str:
    """The GPU's name on CUDA, else the CPU's (platform.processor(), or the machine type)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def table_key(unet: torch.nn.Module, height: int, width: int, batch: int, device: torch.device,
              dtype: str) -> Dict[str, object]:
    """What a cost table depends on: architecture, latent size, batch (images, CFG doubles it), hardware,
    dtype, CPU threads and torch version."""
    device = torch.device(device)
    return {"config": config_hash(unet), "latent": [height, width], "batch": batch, "device": device.type,
            "hardware": hardware_name(device), "threads": torch.get_num_threads(), "dtype": dtype,
            "torch": torch.__version__}


def _calibration_strategy(entries: Sequence[Tuple[int, float]]) -> Strategy:
    """Two full warm-up steps (they fill the caches and the two DiffScore maps), then one step per entry."""
    depths = [MAX_DEPTH, MAX_DEPTH] + [d for d, _ in entries]
    ratios = [0.0, 0.0] + [r for _, r in entries]
    return Strategy(depths, ratios, name="calibration")


def vector_width(unet: torch.nn.Module) -> Optional[int]:
    """Width of the vector y a 'sequential' class-conditional UNet takes (SDXL: 2816), else None."""
    if getattr(unet, "num_classes", None) != "sequential":
        return None
    return unet.label_emb[0][0].in_features


def unet_inputs(unet: torch.nn.Module, height: int, width: int, batch: int, device):
    """Random CFG-shaped UNet inputs (seeded, drawn on the CPU): x (2B, C, h, w), t (2B,), and the conditioning
    keywords: context (2B, 77, D), plus y (2B, V) for a UNet with vector conditioning (SDXL)."""
    g = torch.Generator().manual_seed(0)
    channels = unet.in_channels
    x = torch.randn(2 * batch, channels, height, width, generator=g).to(device)
    t = torch.full((2 * batch,), 500, dtype=torch.long).to(device)
    cond = {"context": torch.randn(2 * batch, 77, context_width(unet), generator=g).to(device)}
    if vector_width(unet) is not None:
        cond["y"] = torch.randn(2 * batch, vector_width(unet), generator=g).to(device)
    return x, t, cond


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_entries(unet: torch.nn.Module, entries: Sequence[Tuple[int, float]], x: torch.Tensor, t: torch.Tensor,
                 cond: Dict[str, torch.Tensor], autocast, on_call: Optional[Callable[[], None]] = None,
                 compute: Optional[Callable] = None) -> Dict[str, float]:
    """One calibration pass of the (unpatched) `unet`: two full steps that fill the caches (untimed), then one
    timed call per (depth, ratio) entry, in the given order. Returns {entry name: seconds}.

    x, t, cond: UNet inputs and conditioning keywords (`unet_inputs`); autocast: the precision context of the calls.
    compute: what runs the blocks of a call instead of `datosd.caching.compute_blocks` (e.g. a compiled version).
    """
    state = apply_patch(unet, _calibration_strategy(entries))
    state.use_compute(compute)
    seconds = {}
    try:
        state.sampling_started(len(entries) + 2)
        with torch.no_grad(), autocast:
            for step in range(len(entries) + 2):
                state.step_started(step)
                state.model_call(True)
                _synchronize(x.device)
                started = time.perf_counter()
                unet(x, t, **cond)
                _synchronize(x.device)
                elapsed = time.perf_counter() - started
                if step >= 2:
                    seconds[entry_name(*entries[step - 2])] = elapsed
                if on_call is not None:
                    on_call()
    finally:
        remove_patch(unet)
    return seconds


def table_entries(depths: Iterable[int] = SEARCH_DEPTHS,
                  ratios: Iterable[float] = SEARCH_RATIOS) -> List[Tuple[int, float]]:
    """Distinct (depth, ratio) entries; depth 0 appears once."""
    entries, seen = [], set()
    for depth in depths:
        for ratio in ratios:
            name = entry_name(depth, ratio)
            if name not in seen:
                seen.add(name)
                entries.append((min(int(depth), MAX_DEPTH), 0.0 if depth == 0 else float(ratio)))
    return entries


def measure_table(model: torch.nn.Module, height: int, width: int, batch: int = 1,
                  entries: Optional[Sequence[Tuple[int, float]]] = None, repeats: int = 3,
                  precision: str = "full", seed: int = 0, progress: bool = True,
                  count_macs: bool = True) -> CostTable:
    """Measure seconds per UNet call for every entry, interleaved over `repeats` passes in shuffled order,
    after one untimed pass in which every entry runs once (its one-off costs are not timed).

    height, width: latent size; batch: images per call (the UNet sees 2 * batch with guidance).
    precision: 'full' (float32) or 'autocast' (float16 on CUDA, bfloat16 on CPU).
    """
    unet = find_unet(model)
    if getattr(unet, "_dato", None) is not None:
        raise ValueError("measure the cost table on an unpatched model (remove_patch first)")
    entries = list(entries or table_entries())
    device = next(unet.parameters()).device
    autocast = precision_scope(precision, device)
    table = CostTable(key=table_key(unet, height, width, batch, device, precision_name(precision, device)))
    x, t, cond = unet_inputs(unet, height, width, batch, device)
    order = random.Random(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=(repeats + 1) * (len(entries) + 2), desc="cost table, untimed pass")
    on_call = bar.update if bar is not None else None
    time_entries(unet, entries, x, t, cond, autocast, on_call=on_call)
    for repeat in range(repeats):
        shuffled = list(entries)
        order.shuffle(shuffled)
        if bar is not None:
            bar.set_description(f"cost table, pass {repeat + 1}/{repeats}")
        seconds = time_entries(unet, shuffled, x, t, cond, autocast, on_call=on_call)
        for name, value in seconds.items():
            table.raw_seconds.setdefault(name, []).append(value)
    if bar is not None:
        bar.close()
    for name, values in table.raw_seconds.items():
        table.seconds[name] = sorted(values)[len(values) // 2]
    if count_macs:
        table.macs = count_entry_macs(unet, height, width, batch, entries)
    return table


def count_entry_macs(unet: torch.nn.Module, height: int, width: int, batch: int,
                     entries: Sequence[Tuple[int, float]]) -> Dict[str, int]:
    """Exact MACs (FLOPs / 2 from torch's FlopCounterMode) of one UNet call per entry, token selection
    included. Runs on the meta device when the UNet is there (no compute), else for real. Attention runs
    on the math backend while counting: the fused CPU kernel has no FLOP formula and would count nothing."""
    device = next(unet.parameters()).device
    x, t, cond = unet_inputs(unet, height, width, batch, device)
    state = apply_patch(unet, _calibration_strategy(entries))
    macs = {}
    try:
        state.sampling_started(len(entries) + 2)
        with torch.no_grad():
            for step in range(len(entries) + 2):
                state.step_started(step)
                state.model_call(True)
                counter = FlopCounterMode(display=False) if step >= 2 else None  # the 2 full steps: not counted
                with counter or nullcontext(), sdpa_kernel(SDPBackend.MATH):
                    unet(x, t, **cond)
                if counter is not None:
                    macs[entry_name(*entries[step - 2])] = counter.get_total_flops() // 2
    finally:
        remove_patch(unet)
    return macs


def plain_unet_macs(unet: torch.nn.Module, height: int, width: int, batch: int) -> int:
    """MACs of one call of the unpatched UNet (CFG batch), for reference."""
    device = next(unet.parameters()).device
    x, t, cond = unet_inputs(unet, height, width, batch, device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        unet(x, t, **cond)
    return counter.get_total_flops() // 2
