"""The latency objective from the per-step cost table (``sdgen.costs``): found in a stored table or measured."""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch

from sdgen.costs import CostTable, find_table, measure_table, table_key
from datosd.utils import find_unet
from sdgen.runtime import precision_name

from .settings import SearchSettings


def _covers(table: CostTable, entries: Sequence[Tuple[int, float]]) -> bool:
    """Whether `table` has the seconds of every (depth, ratio) entry."""
    try:
        for depth, ratio in entries:
            table.call_seconds(depth, ratio)
    except KeyError:
        return False
    return True


def load_or_measure_table(settings: SearchSettings, model: torch.nn.Module, log: Callable[[str], None]) -> CostTable:
    """The cost table of this model, latent size, batch, device and precision.

    Looked up in ``--cost-table`` and then ``RUN_DIR/costs.json`` by ``costs.table_key``; measured with
    ``costs.measure_table`` when none has every entry the search needs. The table used is stored in
    ``RUN_DIR/costs.json`` (and added to ``--cost-table``), so a restarted search predicts the same latencies.
    """
    unet = find_unet(model)
    run = settings.sampling.run
    _, h, w = run.latent_shape
    device = next(unet.parameters()).device
    dtype = precision_name(run.precision, device)
    key = table_key(unet, h, w, run.batch, device, dtype)
    entries = settings.space.table_entries()
    run_path = settings.run_dir / "costs.json"
    for path in (settings.cost_table, run_path):
        if path is None or not path.exists():
            continue
        table = find_table(path, key)
        if table is not None and _covers(table, entries):
            log(f"cost table: {path} ({len(table.seconds)} entries)")
            if path != run_path:
                table.save(run_path)
            return table
    log(f"cost table: measuring {len(entries)} entries x {settings.table_repeats} passes "
        f"(latent {h}x{w}, batch {run.batch}, {device.type}, {dtype})")
    table = measure_table(model, h, w, run.batch, entries, repeats=settings.table_repeats, precision=run.precision)
    table.save(run_path)
    if settings.cost_table is not None:
        table.save(settings.cost_table)
    return table
