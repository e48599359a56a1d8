"""Cold-start SFT with the AGTO attention losses: the recipe (`config`) and the trainer (`trainer`)."""
