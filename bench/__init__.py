"""Sampler and scheduling benchmarks (no training): Markdown + CSV tables and PNG plots.

    python -m bench table=memory                     # Table A: full vs micro (G=32, m=8) + m sweep
    python -m bench table=sweep                      # Table B: G x m for full, micro, continuous
    python -m bench table=throughput                 # hf_generate, full, micro, continuous and
                                                     #   transformers' generate_batch: tokens/s
    python -m bench table=dynamic data=gsm8k num_prompts=4 group_size=8   # Table E
    python -m bench table=record data=chat num_prompts=16 max_new_tokens=512   # rollouts for C, D
    python -m bench table=predictor data=chat max_new_tokens=512   # Table D: k x length predictor
    python -m bench table=scheduler data=chat max_new_tokens=512   # Table C: scheduler x predictor
    python -m bench table=memory data=chat policy=tiny             # any data / policy group works
    python -m bench table=throughput 'samplers=[micro,continuous]' # the samplers a table compares
    python -m bench table=prompt_kv                                # Table F: copied vs shared KV

Samplers are built from `configs/sampler/<name>.yaml` as training builds them (`core.make_sampler`),
so a new sampler config joins a table by name in `samplers=`. Options: `configs/bench.yaml`.
Outputs go to `bench_results/<table>_<data>.{md,csv}` (+ `_groups` rows, + PNG plots).

    core.py      Bench (model, prompts, spec, measure), make_sampler / make_predictor, writing
    sampling.py  Tables A, B, E and throughput: the samplers compared on the same prompts
    lengths.py   Tables C and D: rollouts recorded once, length predictors, admission orders
    __main__.py  the Hydra entry (`python -m bench`)
"""
import os

# before transformers loads `tokenizers`: the bench forks no workers, and this silences its warning
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
