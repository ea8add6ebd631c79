"""Problem 2: DDIM with the course's 256x256 face UNet (generation, figures, MSE)."""
