"""The compiled one-token path: the output projection's fused matrix-vector product and plain attention in the
compiled decode steps compute what the eager model computes."""
import pytest
import torch
import torch.nn.functional as F

from qaft.deploy import decode as decode_mod
from qaft.deploy import prepare_for_inference
from qaft.deploy.gemv import OneRowLinear, one_row_output
from qaft.models import build_tiny_llama


def _linear(dtype: torch.dtype, bias: bool) -> tuple[torch.nn.Linear, OneRowLinear]:
    torch.manual_seed(0)
    plain = torch.nn.Linear(96, 300, bias=bias).to(dtype)
    return plain, OneRowLinear.wrap(plain)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_linear_equals_linear_eager_and_compiled(dtype, bias):
    torch._dynamo.reset()  # each case compiles the same forward: stay clear of dynamo's recompile limit
    plain, wrapped = _linear(dtype, bias)
    assert wrapped.weight is plain.weight and wrapped.bias is plain.bias
    compiled = torch.compile(wrapped, fullgraph=True, dynamic=False)
    for shape in [(1, 1, 96), (1, 96), (2, 96), (1, 3, 96)]:
        x = torch.randn(shape, dtype=dtype)
        ref = F.linear(x, plain.weight, plain.bias)
        assert torch.equal(wrapped(x), ref)  # eagerly it is F.linear itself
        with torch.inference_mode():
            got = compiled(x)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        # one row: float32 accumulation in another order; more rows: F.linear inside the graph
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=tol * ref.float().abs().max().item())


def test_one_row_output_keeps_tied_embeddings():
    model = build_tiny_llama(vocab_size=256)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    one_row_output(model)
    assert isinstance(model.lm_head, OneRowLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    prepared = prepare_for_inference(build_tiny_llama(vocab_size=256), torch.bfloat16)
    assert isinstance(prepared.lm_head, OneRowLinear) and prepared.lm_head.weight.dtype == torch.bfloat16


def test_compiled_steps_use_plain_attention_on_cpu_and_restore_the_model_setting():
    model = build_tiny_llama(vocab_size=256)
    model.set_attn_implementation("sdpa")
    seen = []
    with decode_mod._step_attention(model, torch.device("cpu"), compile=True):
        seen.append(model.config._attn_implementation)
    with decode_mod._step_attention(model, torch.device("cpu"), compile=False):
        seen.append(model.config._attn_implementation)
    assert seen == ["eager", "sdpa"] and model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError):
        with decode_mod._step_attention(model, torch.device("cpu"), compile=True):
            raise RuntimeError("a failing step")
    assert model.config._attn_implementation == "sdpa"
