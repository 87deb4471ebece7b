"""Fine-tuning on perturbation data, optionally from a foundation checkpoint.

    torchrun --nproc_per_node 4 launch/finetune.py --init runs/pretrain/foundation \
        --config configs/finetune.yaml data.store=STORE
    deepspeed --num_gpus 8 launch/finetune.py --init ... --config ... train.engine.backend=deepspeed

See perturbdiff/train/run.py.
"""

import sys

from perturbdiff.train.run import FINETUNE, main

if __name__ == "__main__":
    sys.exit(main(FINETUNE))
