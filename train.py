"""Train a diffusion model: `python train.py schedule=cosine dataset=persian` (see conf/ for every option)."""

import sys

from diffusion_lab.train import main
from diffusion_lab.utils.cli import exit_on_bad_input
from diffusion_lab.utils.extras import check_hydra_plugins

if __name__ == "__main__":
    with exit_on_bad_input():  # a launcher or sweeper of a missing extra: one line naming it
        check_hydra_plugins(sys.argv[1:])
    main()
