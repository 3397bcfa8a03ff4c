"""Train a policy with Inverse-Q*: each epoch samples responses with the current policy, scores
every token with two frozen guides (pi_w: the model given the principle, pi_l: the plain model)
and regresses log pi_theta onto log pi_hat, pi_hat ~ pi_w^alpha * pi_l^(1-alpha).

Examples:
    python train.py                                   # SmolLM2-135M on CPU, bundled prompts
    python train.py model=tiny epochs=1               # seconds: a random tiny Llama (smoke test)
    python train.py -m alpha=1.0,1.2,1.4 model=tiny epochs=1   # an alpha sweep, one directory per run
    python train.py model=zephyr alpha=1.2 strategy=deepspeed_zero3   # the paper's Zephyr-7B run (GPUs, hub)
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from iq_lightning.cli import check_command_line, configure_environment, launch_rank, resume_command, single_log_stream, user_errors_as_one_line

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@user_errors_as_one_line
def main(cfg: DictConfig) -> None:
    from iq_lightning.config import build_run_config
    from iq_lightning.errors import Stopped
    from iq_lightning.run import train

    single_log_stream()  # after Lightning's import has attached its handlers

    run = build_run_config(cfg, HydraConfig.get().runtime.output_dir)
    try:
        train(run, rank=launch_rank())
    except Stopped as exc:
        raise Stopped(f"{exc}: {resume_command('train.py', HydraConfig.get().overrides.task, run.run_dir)}") from None


if __name__ == "__main__":
    configure_environment()
    check_command_line(CONF, "train", __doc__)  # --help, and every mistake as one error: line
    main()
