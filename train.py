"""Train a policy with Inverse-Q*. Examples:

    python train.py                                   # SmolLM2-135M on CPU, bundled prompts
    python train.py model=zephyr alpha=1.2            # paper settings (GPU, HF hub)
    python train.py -m alpha=1.0,1.2,1.4 model=tiny epochs=1
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from iq_lightning.cli import configure_environment, single_log_stream, user_errors_as_one_line


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@user_errors_as_one_line
def main(cfg: DictConfig) -> None:
    from iq_lightning.config import build_run_config
    from iq_lightning.run import train

    single_log_stream()  # after Lightning's import has attached its handlers

    run = build_run_config(cfg, HydraConfig.get().runtime.output_dir)
    train(run)


if __name__ == "__main__":
    configure_environment()
    main()
