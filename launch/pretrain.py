"""Foundation pretraining (marginal: sets given their context; no control stream, no perturbation).

    deepspeed --num_gpus 8 launch/pretrain.py --config configs/pretrain.yaml data.store=STORE
    deepspeed --hostfile hosts --num_nodes 2 --num_gpus 8 launch/pretrain.py --config ...   (multi-node)
    python launch/pretrain.py --config configs/pretrain.yaml ...                             (one process)

Several datasets: data.stores=[A.zarr,B.zarr] (union gene vocabulary). See perturbdiff/train/run.py.
"""

import sys

from perturbdiff.train.run import PRETRAIN, main

if __name__ == "__main__":
    sys.exit(main(PRETRAIN))
