"""The paper's CIFAR-10 table, meant for a GPU or TPU.

Prepare the data once, with internet::

  pip install tensorflow-cpu pillow
  tfds build cifar10 --data_dir=$HOME/tensorflow_datasets --file_format=array_record

Run (rerunning continues where it stopped; ``--n_workers=<GPUs>`` trains one run
per GPU; ``--stages=train`` on the accelerators, then ``--stages=evaluate,report``)::

  pip install -e ".[plots]" && python experiments/paper/cifar10.py

The paper's setting: ResNet-18, SGD with momentum 0.9, lr 0.01 decayed x0.1 at
epochs 75 and 90, 100 epochs, eps = 8/255, random crop and flip; 45,000 images to
train (5,000 held out, which advbench trains on), clean, FGSM, PGD-10 and PGD-20
on the 10,000 test images, AutoAttack (standard) on the first 1,000. Writes
docs/results_cifar10.md. ``--config.model.dtype=bfloat16`` trains in mixed
precision (about twice as fast on recent GPUs; not checked against float32 on
this table).
"""

from dale_jax.cli import paper as paper_cli
from dale_jax.research import paper

EXPERIMENT = paper.Experiment(
    name="cifar10",
    config="cifar10",
    algorithms=("ERM", "PGD", "TRADES", "MART", "Gaussian_DALE_PD", "KL_DALE_PD", "DALE"),
    seeds=2,
    overrides=("--config.num_epochs=100", "--config.schedule.boundaries=(75,90)",
               "--config.schedule.scales=(0.1,0.01)", "--config.optimizer.learning_rate=0.01",
               "--config.eval.evaluators=('Clean','PGD','FGSM')"),
    aa_examples=1000,
    published="cifar10",
    primal_dual="Gaussian_DALE_PD",
    setting=(
        "CIFAR-10 (tfds): 45,000 images to train, 5,000 held out, 10,000 to test; "
        "ResNet-18, SGD with momentum 0.9, lr 0.01 x0.1 at epochs 75 and 90, 100 epochs "
        "(the paper's), advbench's CIFAR samplers and losses, random crop and flip."),
    caveats=(
        "The paper's DALE-10 row: the DALE runs here take advbench's CIFAR sampler "
        "settings.",
        "Hyperparameter selection: every method runs its defaults (the last epoch's "
        "model); `dale-sweep --n_hparams` and `dale-collect` search them.",
    ),
)

if __name__ == "__main__":
  paper_cli.run(EXPERIMENT, doc="docs/results_cifar10.md")
