"""Run by tests/test_distributed.py, once per process (under torchrun, or alone): train from
the ``meanflow train`` arguments given and save this rank's final weights to
``$MEANFLOW_TEST_DUMP/rank{RANK}.safetensors``. Not a test module itself."""

import faulthandler
import os
import signal
import sys

from safetensors.torch import save_file

from meanflow.cli import build_parser
from meanflow.threads import set_threads
from meanflow.train.command import _train_config
from meanflow.train.loop import train

if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)
    args = build_parser().parse_args(["train", *sys.argv[1:]])
    set_threads(args.threads)
    cfg, data, resume, overwrite, _ = _train_config(args)
    result = train(cfg, args.out, resume=resume, overwrite=overwrite, progress=False, data=data)
    state = {f"model.{k}": v.detach().contiguous() for k, v in result.model.state_dict().items()}
    state.update({f"ema.{k}": v.detach().contiguous()
                  for k, v in result.ema_model.state_dict().items()})
    rank = os.environ.get("RANK", "0")
    save_file(state, os.path.join(os.environ["MEANFLOW_TEST_DUMP"], f"rank{rank}.safetensors"))
