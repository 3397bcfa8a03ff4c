"""Judge contestants' answers pairwise and report win rates, Elo and the paper's plots: every
contestant answers the held-out prompts, a judge (measured first) compares answers pair by pair.

Examples:
    python evaluate.py '+contestants.iq.run_dir="outputs/2026-11-23/10-00-00"'   # SFT vs Prompting vs your run
    python evaluate.py 'sweep_dir="multirun/2026-11-23/11-00-00"' pairs=reference   # an alpha sweep (Fig. 7)
    python evaluate.py judge=openai judge.model=gpt-4-turbo
    python evaluate.py reward.model=/path/to/reward_model reward.run_dir=outputs/...   # Fig. 6
    python evaluate.py '+contestants.iq.run_dir="outputs/2026-11-23/10-00-00"' beam_sweep.contestant=iq pairs=reference   # win rate vs beams
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from iq_lightning.cli import check_command_line, check_output_dir, configure_environment, single_log_stream, user_errors_as_one_line

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@user_errors_as_one_line
def main(cfg: DictConfig) -> None:
    from iq_lightning.evaluation.run import evaluate
    from iq_lightning.evaluation.spec import build_eval_spec

    from hydra.core.hydra_config import HydraConfig

    single_log_stream()
    evaluate(build_eval_spec(cfg, HydraConfig.get().overrides.task))  # the command line wins over the runs' settings


if __name__ == "__main__":
    configure_environment()
    check_command_line(CONF, "evaluate", __doc__)  # --help, and every mistake as one error: line
    check_output_dir(CONF, "evaluate")  # a directory Hydra cannot create: one error: line
    main()
