"""Process plumbing used by every stage: torch.distributed helpers, progress and metrics logging."""
