"""The ``TRAINER_*`` variables that carry a launch's settings to the processes it starts.

``trainer launch`` (``trainer.config.process_environment``) and ``notebook_launcher`` write them;
``PartialState``, the ``Accelerator`` and the ``Trainer`` read them where the script leaves a
setting open. Each strategy's section travels as ``TRAINER_<SECTION>`` (``TRAINER_FSDP_CONFIG``),
named by its spec.
"""

PRECISION = "TRAINER_MIXED_PRECISION"  # a precision name
STRATEGY = "TRAINER_STRATEGY"  # "auto" or a strategy's name
ACCUMULATION = "TRAINER_GRADIENT_ACCUMULATION_STEPS"  # micro-batches per optimizer step
USE_CPU = "TRAINER_USE_CPU"  # "1": run on the CPU even where an accelerator is present
PROCESS_GROUP_TIMEOUT = "TRAINER_PROCESS_GROUP_TIMEOUT"  # seconds a collective waits (a launch sets 600 by default)
DYNAMO = "TRAINER_DYNAMO_CONFIG"  # the YAML dynamo_config section, as JSON: torch.compile for prepared models
PARALLELISM = "TRAINER_PARALLELISM_CONFIG"  # ParallelismConfig's sizes, as JSON (the parallelism_config section)
RESTART_COUNT = "TRAINER_RESTART_COUNT"  # 0 on a launch's first attempt, 1 after this machine's first restart...
