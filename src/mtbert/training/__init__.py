"""Training: the trainer, optimizer set-up, task schedules, loss weightings, techniques, the resumable state, contrastive pre-training."""
