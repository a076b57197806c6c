"""Accelerate's breakpoint triggers (test_script.py's test_trigger) and its multi-process logger, from the trainer paths."""

import logging
import sys

from trainer import Accelerator
from trainer.logging import get_logger

logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO, force=True)
logger = get_logger(__name__, log_level="INFO")


def test_trigger():
    accelerator = Accelerator()
    assert accelerator.check_trigger() is False
    if accelerator.process_index == 0:
        accelerator.set_trigger()
    assert accelerator.check_trigger() is True  # on every process
    assert accelerator.check_trigger() is False  # lowered again
    return accelerator


def main():
    accelerator = test_trigger()
    logger.info("from the main process only")
    logger.info(f"in order from process {accelerator.process_index}", main_process_only=False, in_order=True)
    logger.warning_once("once")
    logger.warning_once("once")
    accelerator.wait_for_everyone()
    sys.stdout.write(f"TRIGGER OK rank {accelerator.process_index}\n")  # one write: the ranks share the pipe
    sys.stdout.flush()
    accelerator.end_training()


if __name__ == "__main__":
    main()
