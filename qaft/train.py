"""``qaft-train`` (and ``python -m qaft.train``): validate the composed config, then run it.

With no arguments this is the main job: L4Q at int4, groups of 64, on SmolLM2-135M fine-tuned on Austen,
ending with a float / PTQ / L4Q perplexity table. ``qaft-train -m method.bits=4,3 method.init=minmax,l4q,mse``
sweeps; ``hydra/launcher=slurm`` sends each sweep job to a cluster as a DDP run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qaft.config_schema import ConfigError, validate

# The repository's top-level conf/ (the package is installed editable); absolute, because Hydra resolves a
# relative path against the calling module, which differs between `qaft-train` and `python -m qaft.train`.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the deployed model's perplexity (for sweepers that optimise it)."""
    try:
        spec = validate(cfg)
    except ConfigError as err:
        from qaft.pipeline import discard_run_dir

        discard_run_dir(cfg.get("runs_root"))
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # one bad sweep point is reported by Hydra; the others still run
        print(f"qaft-train: invalid config: {err}", file=sys.stderr)
        sys.exit(2)
    # Imported only now: a config error should cost no more than the imports validation needs.
    from qaft.evaluate import deployed_key
    from qaft.pipeline import run

    metrics = run(cfg, spec)
    if not metrics:
        return None
    key = "ppl_" + deployed_key({k[4:]: v for k, v in metrics.items() if k.startswith("ppl_")})
    return metrics.get(key)


if __name__ == "__main__":
    main()
