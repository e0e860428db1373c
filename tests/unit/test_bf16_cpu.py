"""bf16 on the CPU (the tiny scale trains with ``trainer.precision=bf16-mixed`` and scores with
``eval.autocast=bf16``): every method trains under bf16 autocast, and a bit-exact method's merge scores exactly
as its trained model did, bit for bit, in that precision too; the float32 output projection of scoring is the
model's own head, put back afterwards."""
import pytest
import torch

import qaft
from qaft.methods.config import traits
from qaft.evaluation.perplexity import batches_scores, scoring_precision

from helpers import tiny_llama, token_batch, train_steps
from method_matrix import applied, methods


@pytest.mark.parametrize("name", methods())
def test_a_bit_exact_merge_scores_as_its_bf16_trained_model_bit_for_bit(name):
    model = train_steps(applied(name), token_batch(), 2, 1e-2, autocast=torch.bfloat16)
    batch = {"input_ids": token_batch(seed=7)}
    trained = batches_scores(model, [batch], autocast="bf16")
    merged = batches_scores(qaft.merge_model(model), [batch], autocast="bf16")
    assert all(map(torch.isfinite, map(torch.tensor, trained.nll_sum)))
    if traits(name).bit_exact:
        assert merged == trained
    else:  # float rounding apart (a float merge, QA-LoRA's offsets)
        assert merged.perplexity == pytest.approx(trained.perplexity, rel=2e-2)


def test_scoring_in_bf16_keeps_the_head_in_float32_and_puts_the_model_back():
    model, ids = tiny_llama(), token_batch(seed=3)
    head = model.get_output_embeddings()
    with torch.no_grad():
        with scoring_precision(model, "bf16"):
            logits = model(ids).logits
        plain = model(ids).logits
    assert logits.dtype == torch.float32 and model.get_output_embeddings() is head
    assert model.get_input_embeddings().weight is head.weight  # tied weights stay tied
    torch.testing.assert_close(logits, plain, rtol=0, atol=0.05 * plain.abs().max().item())
    assert not torch.equal(logits, plain)  # the body did run in bf16
