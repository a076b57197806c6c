"""File names Accelerate's scripts refer to, with the values the files here have."""

MODEL_NAME = "pytorch_model"
SAFE_MODEL_NAME = "model"  # save_state writes model.safetensors (model_1.safetensors for a second model)
OPTIMIZER_NAME = "optimizer"
SCHEDULER_NAME = "scheduler"
SAMPLER_NAME = "sampler"
SCALER_NAME = "scaler.pt"
RNG_STATE_NAME = "random_states"
PROFILE_PATTERN_NAME = "profile_{suffix}.json"
WEIGHTS_NAME = f"{MODEL_NAME}.bin"
WEIGHTS_PATTERN_NAME = "pytorch_model{suffix}.bin"
WEIGHTS_INDEX_NAME = f"{WEIGHTS_NAME}.index.json"
SAFE_WEIGHTS_NAME = f"{SAFE_MODEL_NAME}.safetensors"  # what save_model writes
SAFE_WEIGHTS_PATTERN_NAME = "model{suffix}.safetensors"
SAFE_WEIGHTS_INDEX_NAME = f"{SAFE_WEIGHTS_NAME}.index.json"
TORCH_LAUNCH_PARAMS = ["nnodes", "nproc_per_node", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "rdzv_conf", "standalone",
                       "max_restarts", "monitor_interval", "start_method", "role", "module", "m", "no_python",
                       "run_path", "log_dir", "r", "redirects", "t", "tee", "node_rank", "master_addr", "master_port"]
TORCH_DISTRIBUTED_OPERATION_TYPES = ["all_gather", "all_reduce", "all_to_all", "broadcast", "gather", "recv", "reduce",
                                     "scatter", "send", "all_gather_into_tensor", "reduce_scatter_tensor"]
XPU_PROFILING_AVAILABLE_PYTORCH_VERSION = "2.4.0"
MITA_PROFILING_AVAILABLE_PYTORCH_VERSION = "2.1.0"
