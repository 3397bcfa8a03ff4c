"""Train a policy with Inverse-Q*: each epoch samples responses with the current policy, scores
every token with two frozen guides (pi_w: the model given the principle, pi_l: the plain model)
and regresses log pi_theta onto log pi_hat, pi_hat ~ pi_w^alpha * pi_l^(1-alpha).

Examples:
    python train.py                                   # SmolLM2-135M on CPU, bundled prompts
    python train.py model=tiny epochs=1               # seconds: a random tiny Llama (smoke test)
    python train.py -m alpha=1.0,1.2,1.4 model=tiny epochs=1   # an alpha sweep, one directory per run
    python train.py model=zephyr alpha=1.2 strategy=deepspeed_zero3   # the paper's Zephyr-7B run (GPUs, hub)
"""

import dataclasses
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from iq_lightning.cli import (
    check_command_line,
    check_output_dir,
    check_shared_run_dir,
    configure_environment,
    external_launch,
    launch_rank,
    own_log_overrides,
    resume_hint,
    run_name,
    single_log_stream,
    user_errors_as_one_line,
)

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@user_errors_as_one_line
def main(cfg: DictConfig) -> None:
    if cfg.get("numerics") == "portable":
        from iq_lightning.numerics import pin_portable

        pin_portable(os.environ)  # read when torch loads, below: it must come first
    from iq_lightning.run import FINGERPRINT_FILE, configure, train

    single_log_stream()  # after Lightning's import has attached its handlers

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)  # one sweep job's own overrides
    run = configure(cfg, hydra_cfg.runtime.output_dir)
    if run.logger.name is None:  # W&B tells a sweep's runs apart by name
        run = dataclasses.replace(run, logger=dataclasses.replace(run.logger, name=run_name(overrides) or run.run_dir.name))
    begun = time.time()
    fingerprint = run.run_dir / FINGERPRINT_FILE  # rewritten when training starts (run.RunStarted)
    with resume_hint(sys.argv[0], overrides, run.run_dir, lambda: fingerprint.exists() and fingerprint.stat().st_mtime >= begun):
        train(run, rank=launch_rank(), overrides=overrides)


if __name__ == "__main__":
    configure_environment()
    check_command_line(CONF, "train", __doc__)  # --help, and every mistake as one error: line
    check_output_dir(CONF, "train")  # a directory Hydra cannot create: one error: line
    launch = external_launch(os.environ)
    check_shared_run_dir(CONF, "train", launch)  # one run directory for every process
    sys.argv += own_log_overrides(launch)
    main()
