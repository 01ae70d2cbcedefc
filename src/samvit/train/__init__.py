"""Training: the shared loop (launch, DDP/FSDP2, activation checkpointing, mixed precision, exact resume,
logging), its data and optimizer parts, and the MAE pre-training that runs on it."""
