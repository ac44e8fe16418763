"""LoRA under PyTorch DistributedDataParallel: 2 gloo processes (PyTorch).

Follows the Keras PyTorch distributed guide: each process joins a gloo group
on localhost, wraps the adapted Keras model in `DistributedDataParallel`,
builds a torch optimizer on `ddp_model.parameters()` and runs a custom loop
on its own half of the global batch; process 0 saves the adapter. The parent
then runs the same loop in one process on the whole batch and prints the
facts `tests/test_distributed.py` asserts.

Usage: KERAS_BACKEND=torch python tests/distributed/torch_ddp.py PORT WORK_DIR
"""

import os
import sys

import torch

import keras_lora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

WORLD_SIZE = 2


def train(module, x, y):
    """The guide's loop: torch optimizer and loss on the module's parameters."""
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y).long()
    for _ in range(common.STEPS):
        loss = loss_fn(module(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def worker(rank, port, work_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
    )
    try:
        model = common.adapted_mlp()
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        local = common.GLOBAL_BATCH // WORLD_SIZE
        x, y = common.mlp_data()
        rows = slice(rank * local, (rank + 1) * local)
        train(ddp_model, x[rows], y[rows])
        if rank == 0:
            keras_lora.save_adapter(model, os.path.join(work_dir, "adapter.keras"))
    finally:
        torch.distributed.destroy_process_group()


def main(port, work_dir):
    torch.multiprocessing.start_processes(
        worker,
        args=(port, work_dir),
        nprocs=WORLD_SIZE,
        join=True,
        start_method="fork",
    )
    untrained = common.adapted_mlp()
    trained_names = [n for n, p in untrained.named_parameters() if p.requires_grad]
    reference = common.adapted_mlp()
    train(reference, *common.mlp_data())
    distributed = keras_lora.load_adapter(
        common.adapted_mlp(seed=3), os.path.join(work_dir, "adapter.keras")
    )
    common.report(
        {
            "trained_parameters": sorted(trained_names),
            "difference": common.max_difference(
                common.factors(distributed), common.factors(reference)
            ),
            "moved": common.max_difference(
                common.factors(reference), common.factors(untrained)
            ),
        }
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
