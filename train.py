"""Train a diffusion model: `python train.py schedule=cosine dataset=persian` (see conf/ for every option)."""

from diffusion_lab.train import main

if __name__ == "__main__":
    main()
