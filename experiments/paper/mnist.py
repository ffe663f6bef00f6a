"""The paper's MNIST table on the full dataset, meant for a GPU or TPU.

Prepare the data once, with internet::

  pip install tensorflow-cpu pillow
  tfds build mnist --data_dir=$HOME/tensorflow_datasets --file_format=array_record

Run (rerunning continues where it stopped; ``--n_workers=<GPUs>`` trains one run
per GPU; ``--stages=train`` on the accelerators, then ``--stages=evaluate,report``)::

  pip install -e ".[plots]" && python experiments/paper/mnist.py

The paper's setting: 60,000 training images (6,000 held out for validation, as
advbench), the four-layer CNN, batch 128, eps = 0.3, advbench's 50-epoch MNIST
schedule (lr 0.01, x0.1 at 25, x0.01 at 35, x0.001 at 40); clean, FGSM, PGD-10
and PGD-20 on the 10,000 test images, AutoAttack (standard) on the first 1,000.
Writes docs/results_mnist.md. The command says how to prepare the data when it
is missing.
"""

from dale_jax.cli import paper as paper_cli
from dale_jax.research import paper

EXPERIMENT = paper.Experiment(
    name="mnist",
    config="mnist",
    algorithms=("ERM", "FGSM", "PGD", "TRADES", "MART", "Gaussian_DALE_PD", "KL_DALE_PD",
                "DALE"),
    seeds=2,
    overrides=("--config.batch_size=128",
               "--config.eval.evaluators=('Clean','PGD','FGSM')"),
    aa_examples=1000,
    published="mnist",
    primal_dual="Gaussian_DALE_PD",
    setting=(
        "MNIST (tfds): 54,000 images to train, 6,000 held out, 10,000 to test. advbench's "
        "MNIST hyperparameters and 50-epoch schedule (lr 0.01, x0.1 at epoch 25, x0.01 at "
        "35, x0.001 at 40), the paper's batch of 128 (`experiments/paper/mnist.py`)."),
    caveats=(
        "The paper's DALE-1 and DALE-100 rows: the DALE runs here take advbench's "
        "sampler settings.",
        "Hyperparameter selection: every method runs its defaults (the last epoch's "
        "model); `dale-sweep --n_hparams` and `dale-collect` search them.",
    ),
)

if __name__ == "__main__":
  paper_cli.run(EXPERIMENT, doc="docs/results_mnist.md")
