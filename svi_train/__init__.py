"""svi_train: the error-recycling LoRA trainer (Lightning + webdataset + Hydra); arrives with the training issue."""
