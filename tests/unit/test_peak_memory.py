import pytest
import torch
from torch import nn

from qaft.training.peak_memory import PeakMemory, live_heap_bytes, tensor_bytes


class Blowup(nn.Module):
    """Saves a 64 MiB activation for backward, then reduces it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.expand(16 * 2**20).clone() * self.w).square().sum()


@pytest.mark.skipif(torch.cuda.is_available() or live_heap_bytes() is None, reason="the CPU heap path")
def test_peak_sees_the_saved_activation_and_hooks_are_removed():
    model = nn.Sequential(Blowup())
    memory = PeakMemory()
    memory.start(model)
    assert memory.peak_bytes() < tensor_bytes(model) + 32 * 2**20
    model(torch.ones(1)).backward()
    assert memory.peak_bytes() >= tensor_bytes(model) + 64 * 2**20
    memory.stop()
    assert not any(m._forward_hooks for m in model.modules())


def test_sampled_modules_are_the_decoder_layers_and_the_leaves_around_them():
    from transformers import LlamaConfig, LlamaForCausalLM

    from qaft.training.peak_memory import sampled_modules
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    sampled = sampled_modules(model)
    assert sampled[:3] == list(model.model.layers)
    assert {id(m) for m in sampled[3:]} == {id(model.model.embed_tokens), id(model.model.norm),
                                            id(model.model.rotary_emb), id(model.lm_head)}


def test_sampled_steps_are_the_first_two_of_the_run_and_of_every_phase():
    from qaft.training.peak_memory import sampled_step

    def phases(step: int) -> str:  # DL-QAT-like: 3 quantizer-only steps, then the adapter phase
        return "quant" if step < 3 else "lora"

    assert [s for s in range(10) if sampled_step(s, 0, phases)] == [0, 1, 3, 4]
    assert [s for s in range(6, 10) if sampled_step(s, 6, phases)] == [6, 7]  # a run resumed at step 6


@pytest.mark.skipif(torch.cuda.is_available() or live_heap_bytes() is None, reason="the CPU heap path")
def test_an_unwatched_step_is_not_sampled_and_watching_again_samples():
    model = nn.Sequential(Blowup())
    memory = PeakMemory()
    memory.start(model)
    memory.watch(False)
    assert not any(m._forward_hooks for m in model.modules())
    memory.watch(True)
    memory.watch(True)  # idempotent: one hook per module
    assert len(model[0]._forward_hooks) == 1
    model(torch.ones(1)).backward()
    assert memory.peak_bytes() >= tensor_bytes(model) + 64 * 2**20
    memory.stop()
    assert not any(m._forward_hooks for m in model.modules())
