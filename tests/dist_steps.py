"""Helper for test_optim.py, run by plain python or torchrun: three training steps of a tiny model
on the tiny shards with the optimiser the variables select; rank 0 saves the initial and final weights to argv[2].
    python tests/dist_steps.py DATA_DIR OUT.pt           (PARALLEL_MUON etc. from the environment)"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

data, out = Path(sys.argv[1]), sys.argv[2]
env = dict(PRESET="smoke", VOCAB_SIZE="320", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
           NUM_LOOPS="0", TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="1024", MUON_WD="0.1", MUON_ROW_NORMALIZE="1",
           GRAD_CLIP_NORM="0.3", AUTOCAST="off", MAX_WALLCLOCK_SECONDS="0")
env.update({k: v for k, v in os.environ.items() if k in ("PARALLEL_MUON", "GRAD_CLIP_NORM")})
args = tg.Hyperparameters.from_env(env)
rt = tg.init_runtime(args, os.environ)
ctx = tg.Context(args, rt)
accum, local = tg.batch_split(ctx)
torch.manual_seed(0)
model = tg.GPT(args)
init = {k: v.clone() for k, v in model.state_dict().items()}
optimizers = tg.build_optimizers(model, args, rt.device)
ddp = torch.nn.parallel.DistributedDataParallel(model) if rt.distributed and not args.parallel_muon else model
loader = tg.DistributedTokenLoader(tg.shard_files(str(data), "train"), 320, rt.rank, rt.world_size, "cpu")
for step in range(3):
    tg.apply_schedule(optimizers, step, 0.0, args)
    tg.training_step(ddp, optimizers, [loader.next_batch(local, 32) for _ in range(accum)], ctx, accum)
if rt.master:
    torch.save({"init": init, "final": model.state_dict()}, out)
if rt.distributed:
    dist.barrier()
    dist.destroy_process_group()
