"""Every file and directory name the scripts write, in one place (what counts as ours is built from these)."""

LOGS_DIR = "logs"  # TensorBoard event files
VALUE_MODEL_DIR = "value_model"  # the trained critic (gae), beside the final policy and in each checkpoint
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-N, N = the update counter
RUN_SUMMARY_FILE = "run_summary.json"  # written by a PPO run when it ends (finished or interrupted)
REWARD_SUMMARY_FILE = "reward_model_summary.json"  # written by train_reward_model.py
EVALUATION_FILE = "evaluation.json"  # evaluate_generations.py's default output
PROGRESS_FIGURE = "training_progress.png"  # plot_training_progress.py's default figure
SCALARS_CSV = "training_scalars.csv"  # and its CSV export
CARD_FILE = "README.md"  # the model card of a finished run

# Inside a checkpoint.
STATE_FILE = "trainer_state.json"  # the checkpoint's index: counters, config, what it holds (the job's)
ALGORITHM_STATE_FILE = "algorithm_state.json"  # the algorithm's state as data (smolppo.algorithm.state)
OPTIMIZER_TENSORS = "optimizer.safetensors"  # AdamW's moments
DEEPSPEED_DIR = "deepspeed"  # under DeepSpeed instead of the optimizer's tensors: the engine's own sharded state
CHECKPOINT_FORMAT_KEY = "checkpoint_format"  # in STATE_FILE: 2 = the files above; absent = format 1 (below)
# Format 1, written by earlier versions and still resumed (read as plain data only, never unpickled as objects).
LEGACY_OPTIMIZER_FILE = "optimizer.pt"
LEGACY_SCHEDULER_FILE = "scheduler.pt"
LEGACY_RNG_FILE = "rng_state.pt"
MODEL_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# Bookkeeping of an output directory (`smolppo.runs.output_dir`).
MANIFEST = ".smolppo-manifest.json"
LOCK = ".smolppo.lock"
STAGING_PREFIX = ".smolppo-staging-"  # names no user picks by chance: only these exact shapes are removed
TRASH_PREFIX = ".smolppo-trash-"

# evaluate_generations.py --report DIR
REPORT_FILES = {
    "markdown": "report.md",
    "json": "report.json",
    "reward_vs_kl": "reward_vs_kl.png",
    "reward_vs_perplexity": "reward_vs_perplexity.png",
    "lengths": "lengths.png",
}
