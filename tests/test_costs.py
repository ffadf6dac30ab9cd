"""The per-step cost table: predictions add up the entries of the call plan, MAC counts agree with independent
counts, stored tables merge by key, and a noisy entry is flagged by its spread."""
import pytest
import torch
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
