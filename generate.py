"""Write a model's responses for a prompt set to JSONL (a trained run's final/ policy, any
save_pretrained directory, or the model group's model; with a principle: the Prompting baseline).

Examples:
    python generate.py                                        # bundled SmolLM2, held-out prompts
    python generate.py run_dir=outputs/2026-11-23/10-00-00    # a training run's final/ policy, sampled at temperature 0.7
    python generate.py run_dir=outputs/2026-11-23/10-00-00 sampler.temperature=0   # greedy, as training's validation decodes
    python generate.py model_path=/path/to/hf_dir data=local data.path=prompts.jsonl
    python generate.py 'principle="Always reply in French, whatever language the user writes in."'   # the Prompting baseline, training's default principle
    python generate.py run_dir=outputs/2026-11-23/10-00-00 decoding.num_beams=4   # beam search over the policy's likelihood
"""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from iq_lightning.cli import check_command_line, configure_environment, single_log_stream, user_errors_as_one_line

CONF = Path(__file__).resolve().parent / "conf"


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
@user_errors_as_one_line
def main(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    from iq_lightning.config import DataSpec, DecodingSpec, ModelSpec, SamplerSpec, build_spec, validate_sampler
    from iq_lightning.generation import GenerateSpec, generate_responses, model_spec_for

    single_log_stream()  # after Lightning's import has attached its handlers

    plain = OmegaConf.to_container(cfg, resolve=True)
    spec = GenerateSpec(
        model=model_spec_for(plain["run_dir"], plain["model_path"], build_spec(ModelSpec, plain["model"], "model")),
        data=build_spec(DataSpec, plain["data"], "data"),
        sampler=validate_sampler(build_spec(SamplerSpec, plain["sampler"], "sampler")),
        output=Path(plain["output"]),
        seed=plain["seed"],
        principle=plain["principle"],
        placement=plain["placement"],
        name=plain["name"],
        decoding=build_spec(DecodingSpec, plain["decoding"], "decoding"),
    )
    if not spec.decoding.beam_search and spec.sampler.temperature > 0:
        logging.getLogger("generate").info(
            "sampling at sampler.temperature=%g (top_p %g): training's validation decodes greedily; sampler.temperature=0 gives its answers",
            spec.sampler.temperature, spec.sampler.top_p,
        )
    out = generate_responses(spec)
    logging.getLogger("generate").info("wrote the responses to %s", out)


if __name__ == "__main__":
    configure_environment()
    check_command_line(CONF, "generate", __doc__)  # --help, and every mistake as one error: line
    main()
