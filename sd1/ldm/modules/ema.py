"""EMA weights holder with the CompVis `LitEma` state-dict layout (inference only: store, copy, restore)."""
import torch
from torch import nn


def ema_buffer_name(param_name):
    """CompVis stores the EMA copy of parameter `a.b.c` as buffer `abc` (dots removed)."""
    return param_name.replace(".", "")


class LitEma(nn.Module):
    """Holds one buffer per trainable parameter of `model`, named as in CompVis checkpoints (`model_ema.*`)."""

    def __init__(self, model, decay=0.9999, use_num_upates=True):
        super().__init__()
        if decay < 0.0 or decay > 1.0:
            raise ValueError("Decay must be between 0 and 1")
        self.m_name2s_name = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_upates else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = ema_buffer_name(name)
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.clone().detach().data)
        self.collected_params = []

    def copy_to(self, model):
        """Write the EMA weights into `model`'s parameters."""
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name:
                p.data.copy_(shadow[self.m_name2s_name[name]].data)

    def store(self, parameters):
        """Save the current parameters so that `restore` can put them back."""
        self.collected_params = [param.clone() for param in parameters]

    def restore(self, parameters):
        for c_param, param in zip(self.collected_params, parameters):
            param.data.copy_(c_param.data)
        self.collected_params = []
