"""The per-step cost table: predictions add up the entries of the call plan, MAC counts agree with independent
counts, stored tables merge by key, every entry runs untimed before it is timed, and a noisy entry is flagged by
its spread, a cold or disturbed one also by times out of line with the MACs."""
import pytest
import torch

import sdgen.costs
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from datosd import Strategy
from sdgen.costs import (
    CostTable,
    count_entry_macs,
    entry_name,
    find_table,
    measure_table,
    plain_unet_macs,
    table_entries,
    time_entries,
    unet_inputs,
)
from helpers import golden_model


@pytest.fixture(scope="module")
def unet():
    return golden_model().model.diffusion_model


def test_predict_sums_entries_with_the_plms_extra_call():
    strategy = Strategy([1, 12, 0, 1, 12], [0.7, 0.3, 0.5, 0.0, 0.4])
    table = CostTable(key={}, seconds={"d12_r0.70": 10.0, "d12_r0.30": 9.0, "d0": 0.01, "d1_r0.00": 1.5,
                                       "d12_r0.40": 9.5})
    # Step 0 always runs full, PLMS calls it twice: 2 x 10.0, then 9.0, 0.01, 1.5, 9.5.
    assert table.predict(strategy, "plms") == pytest.approx(2 * 10.0 + 9.0 + 0.01 + 1.5 + 9.5)
    assert table.predict(strategy, "ddim") == pytest.approx(10.0 + 9.0 + 0.01 + 1.5 + 9.5)
    with pytest.raises(KeyError, match="d1_r0.50"):
        table.predict(Strategy([12, 1], [0.7, 0.5]))
    assert table.plan_seconds([(12, 0.3), (0, 0.9)]) == pytest.approx(9.01)


def test_spread_flags_a_disturbed_entry():
    table = CostTable(key={}, raw_seconds={"d12_r0.00": [10.0, 10.2, 9.9], "d12_r0.50": [9.0, 30.0, 9.1],
                                           "d1_r0.00": [1.0]})
    assert table.spread("d12_r0.00") == pytest.approx(0.3 / 10.0)
    assert table.spread("d12_r0.50") == pytest.approx(21.0 / 9.1)
    assert table.spread("d1_r0.00") == 0.0  # one repeat: no spread to see
    assert table.noisy_entries(0.2) == {"d12_r0.50": pytest.approx(21.0 / 9.1)}
    assert table.noisy_entries(0.2, names=["d12_r0.00"]) == {}


def test_save_merges_entries_into_the_stored_table(tmp_path):
    path = tmp_path / "costs.json"
    key = {"config": "abc", "latent": [8, 8]}
    CostTable(key=key, seconds={"d0": 0.1, "d12_r0.00": 2.0}, raw_seconds={"d0": [0.1], "d12_r0.00": [2.0]}).save(path)
    CostTable(key=dict(key, latent=[16, 16]), seconds={"d0": 5.0}).save(path)
    CostTable(key=key, seconds={"d12_r0.00": 3.0, "d1_r0.00": 0.5}).save(path)
    merged = find_table(path, key)
    assert merged.seconds == {"d0": 0.1, "d12_r0.00": 3.0, "d1_r0.00": 0.5}
    assert merged.raw_seconds == {"d0": [0.1], "d12_r0.00": [2.0]}
    assert find_table(path, dict(key, latent=[16, 16])).seconds == {"d0": 5.0}


def test_entry_names():
    assert entry_name(0, 0.7) == "d0"
    assert entry_name(15, 0.5) == "d12_r0.50"
    assert [entry_name(*e) for e in table_entries((0, 1), (0.0, 0.5))] == ["d0", "d1_r0.00", "d1_r0.50"]


def test_mac_counts(unet):
    h = w = 16
    entries = [(12, 0.0), (12, 0.5), (0, 0.0), (1, 0.0)]
    macs = count_entry_macs(unet, h, w, 1, entries)
    assert macs["d12_r0.00"] == plain_unet_macs(unet, h, w, 1)
    assert macs["d0"] == 0
    # Depth 1 runs input_blocks[0], output_blocks[11] and the head only: count those modules alone.
    counter = FlopCounterMode(display=False)
    x = torch.randn(2, 4, h, w)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 77, 16)
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        emb = unet.embed_time(t)
        first = unet.input_blocks[0](x, emb, ctx)
        skip_input = torch.randn(2, unet.output_blocks[11][0].channels - first.shape[1], h, w)
        unet.out(unet.output_blocks[11](torch.cat([skip_input, first], 1), emb, ctx))
    assert macs["d1_r0.00"] == counter.get_total_flops() // 2
    # Ratio 0.5 at 16x16: the 5 full-resolution blocks prune K = 128 of N = 256 tokens (C = 32, nb = 64).
    n, c, k, nb, samples = 256, 32, 128, 64, 2
    per_block = (4 * c * c * k  # to_q, to_k, to_v, to_out on K fewer tokens
                 + 2 * c * (n * n - (n - k) ** 2)  # QK^T and AV over N - K tokens
                 - (n - nb) * nb * c)  # the non-base x base similarity of the selection
    assert macs["d12_r0.00"] - macs["d12_r0.50"] == 5 * samples * per_block


def test_measure_table_on_the_tiny_model(unet, tmp_path):
    entries = [(12, 0.0), (12, 0.5), (1, 0.0), (0, 0.0)]
    table = measure_table(unet, 8, 8, batch=1, entries=entries, repeats=2, progress=False)
    assert set(table.seconds) == {"d12_r0.00", "d12_r0.50", "d1_r0.00", "d0"}
    assert all(len(v) == 2 for v in table.raw_seconds.values())
    assert all(table.seconds[k] in v for k, v in table.raw_seconds.items())
    assert table.macs["d0"] == 0
    assert table.key["latent"] == [8, 8] and table.key["batch"] == 1
    path = tmp_path / "costs.json"
    table.save(path)
    other = CostTable(key=dict(table.key, batch=2), seconds={"d0": 1.0})
    other.save(path)
    assert find_table(path, table.key) == table
    assert find_table(path, dict(table.key, latent=[16, 16])) is None
    assert type(unet).__name__ == "UNetModel"


def test_time_entries_times_each_entry_once_after_two_full_steps(unet):
    calls = []
    handle = unet.register_forward_pre_hook(lambda module, args: calls.append(module._dato.planned()))
    try:
        x, t, cond = unet_inputs(unet, 8, 8, 1, "cpu")
        seconds = time_entries(unet, [(1, 0.5), (12, 0.3)], x, t, cond, torch.autocast("cpu", enabled=False))
    finally:
        handle.remove()
    assert set(seconds) == {"d1_r0.50", "d12_r0.30"}
    assert calls == [(12, 0.0), (12, 0.0), (1, 0.5), (12, 0.3)]  # 2 untimed full steps, then the entries in order
    assert getattr(unet, "_dato", None) is None


class ColdStartUnet:
    """An injected clock (sdgen.costs' `time`) that only a UNet call advances: by `steady[(depth, ratio)]` seconds,
    plus `cold` the first time a (depth, ratio) runs, as one-off costs (kernel selection, allocations, casts)
    make the first call of each shape and dtype slow."""

    def __init__(self, unet, steady, cold):
        self.now, self.steady, self.cold, self.seen, self.planned = 0.0, steady, cold, set(), []
        self.handle = unet.register_forward_pre_hook(self.call)

    def call(self, module, args):
        planned = module._dato.planned()
        self.planned.append(planned)
        self.now += self.steady[planned] + (self.cold if planned not in self.seen else 0.0)
        self.seen.add(planned)

    def perf_counter(self):
        return self.now


def test_every_entry_runs_untimed_before_it_is_timed(unet, monkeypatch):
    steady = {(12, 0.0): 2.0, (12, 0.5): 1.5, (12, 0.7): 1.25, (1, 0.0): 0.25, (0, 0.0): 0.0}
    clock = ColdStartUnet(unet, steady, cold=10.0)
    monkeypatch.setattr(sdgen.costs, "time", clock)
    entries = [(12, 0.5), (1, 0.0), (12, 0.7), (0, 0.0), (12, 0.0)]
    try:
        table = measure_table(unet, 8, 8, batch=1, entries=entries, repeats=1, progress=False, count_macs=False)
    finally:
        clock.handle.remove()
    assert table.seconds == {entry_name(*entry): steady[entry] for entry in entries}
    assert table.raw_seconds == {entry_name(*entry): [steady[entry]] for entry in entries}
    # One untimed pass (2 full steps, every entry), then the timed pass (2 full steps, every entry, shuffled).
    assert clock.planned[:7] == [(12, 0.0), (12, 0.0), *entries]
    assert len(clock.planned) == 14 and sorted(clock.planned[9:]) == sorted(entries)


def test_times_out_of_line_with_the_macs_are_flagged_with_one_repeat():
    """The measured case of issue 22: full calls at r = 0, 0.5, 0.6 of nearly equal MACs timed 21.5, 11.6 and
    5.3 s (one repeat each, so no spread to see)."""
    macs = {"d12_r0.00": 100_000, "d12_r0.50": 96_000, "d12_r0.60": 95_000, "d1_r0.00": 5_000}
    cold = CostTable(key={}, seconds={"d12_r0.00": 21.5, "d12_r0.50": 11.6, "d12_r0.60": 5.3, "d1_r0.00": 1.0},
                     raw_seconds={"d12_r0.00": [21.5], "d12_r0.50": [11.6], "d12_r0.60": [5.3], "d1_r0.00": [1.0]},
                     macs=macs)
    assert cold.noisy_entries(0.2) == {}
    mismatches = cold.mac_mismatches()
    assert [(big, small) for big, small, _, _ in mismatches] == [
        ("d12_r0.00", "d12_r0.50"), ("d12_r0.00", "d12_r0.60"), ("d12_r0.50", "d12_r0.60")]
    assert mismatches[1][2:] == (pytest.approx(21.5 / 5.3), pytest.approx(100 / 95))
    assert cold.mac_mismatches(names=["d12_r0.00", "d1_r0.00"]) == []  # 21.5x the time for 20x the MACs: in line
    steady = CostTable(key={}, seconds={"d12_r0.00": 6.0, "d12_r0.50": 5.5, "d12_r0.60": 5.6, "d1_r0.00": 0.5},
                       macs=macs)
    assert steady.mac_mismatches() == []
    # A smaller call clearly slower than a bigger one is out of line too; d0 (no MACs) is never compared.
    slow_small = CostTable(key={}, seconds={"d12_r0.00": 6.0, "d1_r0.00": 9.5, "d0": 3.0},
                           macs={"d12_r0.00": 100_000, "d1_r0.00": 5_000, "d0": 0})
    assert slow_small.mac_mismatches() == [("d12_r0.00", "d1_r0.00", pytest.approx(6.0 / 9.5), 20.0)]
