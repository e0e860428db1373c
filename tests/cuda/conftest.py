"""The tests of this folder run on a CUDA GPU: each module is marked ``cuda`` (skipped without one by
tests/conftest.py) and takes the ``device`` fixture. experiments/bench/device_check.py runs them (and the
``cuda`` variants of the unit tests parametrised over ``helpers.DEVICES``) in one go.

They import only what an air-gapped GPU machine is assumed to have (torch, Lightning, transformers, peft,
safetensors, pandas; tests/integration/test_device_check.py checks it): the two that train through
``qaft-train`` also need Hydra (hydra-core, omegaconf, antlr4-python3-runtime wheels) and skip without it.
"""
import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda")
