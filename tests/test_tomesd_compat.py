"""The real `tomesd` package patches our model (CompVis names and structure) and removes cleanly."""
import tomesd
import torch

from helpers import golden_model


def test_tomesd_changes_output_and_remove_restores_it(golden_io):
    model = golden_model()
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    ctx = golden_io["sample.c"]
    with torch.no_grad():
        before = model.apply_model(x, t, ctx)
        tomesd.apply_patch(model, ratio=0.5)
        patched_blocks = [m for m in model.modules() if type(m).__name__ == "ToMeBlock"]
        merged = model.apply_model(x, t, ctx)
        tomesd.remove_patch(model)
        after = model.apply_model(x, t, ctx)
    assert len(patched_blocks) == 16
    assert (merged - before).abs().max() > 1e-3
    assert torch.equal(after, before)
    assert not any(type(m).__name__ == "ToMeBlock" for m in model.modules())
